"""The logit cache, the shareable artifact of stage 2: codec, shards, inspect/verify/merge/push/pull."""
