"""The README's quickstart transcript cannot rot: scripts/readme-transcript runs scripts/quickstart
again (a real daemon, the sample file, the tiny model, through to adapter 1 and ``trainerd learned``)
and the fresh output matches the README's block in shape — the same commands, lines and words."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow  # ~70 s on 2 quiet cores: the quickstart's 60 tiny steps and two model loads


def test_readme_transcript_matches_a_fresh_quickstart_in_shape():
    """A fresh quickstart run on the tiny model prints what the README's transcript shows, line by
    line, up to figures, times, sizes and the model's answers (the script's --check prints the
    difference and the fresh block when it does not)."""
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "readme-transcript"), "--check"], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "matches a fresh run in shape" in p.stdout
