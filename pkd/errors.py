"""Typed errors. Library code raises these; the CLI prints them as one red line (PKD_DEBUG=1 for
the traceback). Each message names what is wrong and where (file, row, key), and what to do."""


class PkdError(Exception):
    """A user-facing error: the message is complete and actionable on its own."""

    exit_code = 1


class ConfigError(PkdError):
    """A recipe or option is invalid (names the file and key)."""

    exit_code = 2


class InputError(PkdError):
    """User input (prompts, samples, paths) is missing or malformed (names file and line/row)."""

    exit_code = 2


class StorageError(PkdError):
    """A storage URI cannot be used: unknown or uninstalled fsspec backend, unreachable, missing."""


class ManifestError(PkdError):
    """A manifest is missing, unreadable, or unsafe (e.g. a path leaving its folder)."""


class IntegrityError(PkdError):
    """Artifact contents do not match their manifest (sha256, schema, counts, decodability)."""


class CompatibilityError(PkdError):
    """Two artifacts (or an artifact and a model) disagree: tokenizer, vocab, k, codec, proxy."""

    exit_code = 3


class CodecError(PkdError):
    """Unknown codec name/version or parameters outside what the codec supports."""


class ServerError(PkdError):
    """A model server failed to start or stopped answering (the message ends with its log tail)."""


class EndpointError(PkdError):
    """The teacher endpoint cannot serve any request (bad key, unknown model, unreachable host):
    the message says what to fix; work already committed is kept and a rerun resumes."""

    exit_code = 3


class FailureBudgetError(PkdError):
    """More prompts failed permanently than the failure budget allows (see the failures file)."""

    exit_code = 4


class EngineError(PkdError):
    """An inference engine (vLLM or transformers) cannot do what was asked: not installed, an
    adapter it cannot serve, or a request beyond an engine option (the message names the option)."""

    exit_code = 2


class LaunchError(PkdError):
    """Parts launched on a cluster failed for good, or a launcher cannot run (not installed, no
    cluster to reach): the message names the parts, their logs and what to do."""

    exit_code = 6


class BudgetError(PkdError):
    """A run would spend more than `--max-cost`: stopped (online) or refused (batch) before it;
    everything paid for is committed, and a rerun with a higher budget continues."""

    exit_code = 5
