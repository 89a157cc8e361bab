"""Stage 1 of Proxy-KD, the parts of `pkd proxy-align` (orchestrated by pkd.steps.proxy_align):
pair building (data), training (train), proxy self-sampling (sample), held-out metrics
(metrics) and the report (report)."""
