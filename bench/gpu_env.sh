# Source on a device machine: multicast off (shared hosts), carried wheels (hydra, omegaconf,
# antlr4, megatron-core) installed into /tmp/site, repo on the path.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# run SECONDS CMD...: append CMD's output to $LOG (set by the calling script), then its exit code
# and wall time
run() {
  local t=$1 s=$SECONDS rc; shift; echo "### $*" >> "$LOG"
  # -k: a KILL 15 s after the TERM (session 11: a pytest cut by TERM mid-test never exited, and the
  # rest of the call was lost)
  timeout -k 15 "$t" "$@" >> "$LOG" 2>&1; rc=$?; echo "rc=$rc ($((SECONDS - s)) s)" >> "$LOG"
}
