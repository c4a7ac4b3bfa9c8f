"""Megatron BERT built from the tensor-parallel layers in ``parallel``."""
from .bert import MegatronBertModel
from .heads import (
    HEADS,
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
    "HEADS", "ModelOutput", "gather_lm_logits", "MegatronBertModel", "MegatronBertForPreTraining",
    "MegatronBertForMaskedLM", "MegatronBertForCausalLM", "MegatronBertForNextSentencePrediction",
    "MegatronBertForSequenceClassification", "MegatronBertForMultipleChoice",
    "MegatronBertForTokenClassification", "MegatronBertForQuestionAnswering",
]
