"""Shared fixtures: a tiny model family built once per session, and a real vLLM server over its
teacher. Both are session-scoped because they cost seconds (family) and ~20 s (server) to make."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pkd.engines.serve import VllmServer, vllm_server
from pkd.models.tiny import TinyFamily, build_family
from pkd.toy.world import ToyWorld, build_world


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own empty working directory: nothing an earlier command left in the
    checkout (a demo run under cache/, say) changes a result, and no default path of a test
    (the recipe's cache/<run>/...) writes into the checkout. Paths to the repository's own files
    are absolute (REPO = Path(__file__)...)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
    """Tokenizer, student, proxy and teacher sharing one vocabulary (float32, random init)."""
    return build_family(tmp_path_factory.mktemp("tiny-family"), seed=0)


@pytest.fixture(scope="session")
def vllm_teacher(
    tiny_family: TinyFamily, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    """An OpenAI-compatible vLLM server over the tiny teacher, served as "teacher"; float32 so
    its numbers match transformers. Its log stays in the session's tmp dir for debugging."""
    log = tmp_path_factory.mktemp("vllm-teacher") / "server.log"
    with vllm_server(
        tiny_family.teacher, served_model_name="teacher", dtype="float32", log_path=log
    ) as server:
        yield server


@pytest.fixture(scope="session")
def scored_cache(tiny_family: TinyFamily, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A logit cache of 48 synthetic chats scored by the tiny proxy (3 shards, k = 8), in the
    tiny student's tokenizer: what `pkd cache-logits` would write, without vLLM."""
    from scored_cache import score_cache

    uri = str(tmp_path_factory.mktemp("scored-cache"))
    score_cache(tiny_family, uri)
    return uri


@pytest.fixture(scope="session")
def toy_world_quick(tmp_path_factory: pytest.TempPathFactory) -> ToyWorld:
    """The demo's toy world in quick mode (trained teacher, misaligned proxy, weak student);
    ~80 s to build on one core, so only `slow` tests should ask for it. It sits where `pkd demo
    --quick --root DIR` looks for its world (DIR/world), so the demo test reuses it."""
    return build_world(tmp_path_factory.mktemp("demo-quick") / "world", quick=True)
