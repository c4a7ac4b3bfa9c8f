"""Megatron BERT built from the tensor-parallel layers in ``parallel``."""
from .bert import MegatronBertModel
from .heads import (
    HEADS,
    MASKED_LM_HEADS,
    SENTENCE_HEAD_PARTS,
    MegatronBertForCausalLM,
    MegatronBertForMaskedLM,
    MegatronBertForMultipleChoice,
    MegatronBertForNextSentencePrediction,
    MegatronBertForPreTraining,
    MegatronBertForQuestionAnswering,
    MegatronBertForSequenceClassification,
    MegatronBertForTokenClassification,
    ModelOutput,
    gather_lm_logits,
)

__all__ = [
    "HEADS", "MASKED_LM_HEADS", "SENTENCE_HEAD_PARTS", "ModelOutput", "gather_lm_logits", "MegatronBertModel", "MegatronBertForPreTraining",
    "MegatronBertForMaskedLM", "MegatronBertForCausalLM", "MegatronBertForNextSentencePrediction",
    "MegatronBertForSequenceClassification", "MegatronBertForMultipleChoice",
    "MegatronBertForTokenClassification", "MegatronBertForQuestionAnswering",
]
