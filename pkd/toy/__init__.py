"""The embedded toy world (arithmetic tasks, teacher/proxy/student models) and `pkd demo`, with its
real-model variant `pkd demo --real` (SmolLM2-135M-Instruct, real chat prompts)."""
