"""The embedded toy world (arithmetic tasks, teacher/proxy/student models) and `pkd demo`."""
