"""The ```python blocks of README.md and docs/*.md run: a file's blocks in order, in one namespace.

Each file runs in a fresh module namespace with a temporary folder as the working directory
(``REFIT_GYM_DATA`` is left as it is), so the blocks must run on the offline synthetic data. A
block whose fence is directly preceded by an HTML comment line ``<!-- not-run: REASON -->`` is
skipped (a block that needs ML-1M or a GPU, or an abridged excerpt); the reason is for readers.
A failure names the file, the block's number among the file's python blocks and its first line.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import signal
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->\s*$")
FENCE_OPEN = re.compile(r"^\s*```python\s*$")
FENCE_CLOSE = re.compile(r"^\s*```\s*$")
BLOCK_TIMEOUT_S = 60
"""A block that runs longer fails (e.g. one that would pretrain an ML-1M model)."""

KNOWN_UNRUNNABLE: dict[str, tuple[str, str]] = {}
"""Files whose runnable blocks, exactly as they are (the digest of their code), are known not to run
here; any change to those blocks makes the file run again."""


@dataclass(frozen=True)
class Block:
    """One ```python block: its number among the file's python blocks (from 1), where it starts and its code."""

    number: int
    line: int
    code: str
    not_run: Optional[str]


def python_blocks(text: str) -> list[Block]:
    """The file's ```python blocks, with the reason of a ``<!-- not-run: ... -->`` line right above the fence."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if not FENCE_OPEN.match(lines[index]):
            index += 1
            continue
        start = index
        marker = NOT_RUN.match(lines[start - 1]) if start > 0 else None
        index += 1
        body = []
        while index < len(lines) and not FENCE_CLOSE.match(lines[index]):
            body.append(lines[index])
            index += 1
        if index == len(lines):
            raise AssertionError(f"the ```python block at line {start + 1} is never closed")
        indent = len(lines[start]) - len(lines[start].lstrip())
        code = "\n".join(line[indent:] if line[:indent].isspace() else line for line in body)
        blocks.append(Block(len(blocks) + 1, start + 1, code, marker.group("reason") if marker else None))
        index += 1
    return blocks


def digest(blocks: list[Block]) -> str:
    """A short digest of the runnable blocks' code (what ``KNOWN_UNRUNNABLE`` pins)."""
    return hashlib.sha256("\n\x00".join(b.code for b in blocks if b.not_run is None).encode()).hexdigest()[:16]


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    """Raise ``TimeoutError`` in the block when it runs longer than ``seconds`` (main thread, POSIX only)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{what} ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_blocks(name: str, blocks: list[Block]) -> None:
    """Execute the runnable blocks in order in one fresh module; ``pytest.fail`` naming the first that raises."""
    from refit_gym.rewards import REWARD_TERMS

    module = types.ModuleType(f"docs_{re.sub(r'[^0-9A-Za-z_]', '_', name)}")
    sys.modules[module.__name__] = module  # dataclasses and pickling look the module up
    registered = dict(REWARD_TERMS)
    try:
        for block in blocks:
            if block.not_run is not None:
                continue
            where = f"{name}, python block {block.number} (line {block.line})"
            try:
                with time_limit(BLOCK_TIMEOUT_S, where):
                    exec(compile(block.code, where, "exec"), module.__dict__)
            except Exception as error:
                pytest.fail(f"{where} raised {type(error).__name__}: {error}\n\n{traceback.format_exc()}",
                            pytrace=False)
    finally:
        sys.modules.pop(module.__name__, None)
        REWARD_TERMS.clear()  # a block may register a reward term: leave the registry as it was
        REWARD_TERMS.update(registered)


@pytest.mark.parametrize("path", DOCUMENTS, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTS])
def test_python_blocks_run(path, tmp_path, monkeypatch, single_torch_thread):
    blocks = python_blocks(path.read_text())
    if not any(block.not_run is None for block in blocks):
        pytest.skip(f"{path.name} has no python block to run")
    known = KNOWN_UNRUNNABLE.get(path.name)
    if known is not None and digest(blocks) == known[0]:
        pytest.xfail(f"{path.name}: {known[1]}")
    monkeypatch.chdir(tmp_path)
    run_blocks(path.name, blocks)


def test_python_blocks_are_found_with_their_markers():
    text = "\n".join([
        "```python", "a = 1", "```",
        "<!-- not-run: needs ML-1M -->", "```python", "raise SystemExit", "```",
        "```bash", "echo no", "```",
        "<!-- not-run: not directly above -->", "", "```python", "b = a + 1", "```",
        "1. a list item:", "   ```python", "   c = b + 1", "   ```",
    ])
    blocks = python_blocks(text)
    assert [(b.number, b.line, b.code, b.not_run) for b in blocks] == [
        (1, 1, "a = 1", None), (2, 5, "raise SystemExit", "needs ML-1M"), (3, 13, "b = a + 1", None),
        (4, 17, "c = b + 1", None)]


def test_a_failing_block_is_reported_by_file_and_number():
    blocks = python_blocks("```python\nx = 1\n```\n\n```python\ny = x + 1\nraise ValueError('broken on purpose')\n```\n")
    with pytest.raises(pytest.fail.Exception, match=r"example\.md, python block 2 \(line 5\) raised ValueError"):
        run_blocks("example.md", blocks)
    run_blocks("example.md", blocks[:1])  # the blocks before it share one namespace and run


def test_every_document_with_python_is_collected():
    names = {p.name for p in DOCUMENTS}
    assert {"README.md", "environment.md", "rewards.md", "evaluation.md"} <= names
