"""Tests of the scorer seam (charshift.scoring): folders written by an earlier charshift still
load and score the same.

`fixtures/lexical_probe_v1` and `fixtures/embedding_probe_v1` were written by the probe code as it
stood before the scoring package (charshift.probe, commit 525655b), with the predictions and the
identity it gave then beside them (`*.expected.json`). The embedding probe reads the packaged
MiniLM encoder and checks its weights against the recorded sha256, as any user's old probe folder
does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charshift.schema import stable_hash
from charshift.scoring.classifier import load_classifier

FIXTURES = Path(__file__).parent / "fixtures"


# ---------------------------------------------------------------------------- old folders


@pytest.mark.parametrize("name", ["lexical_probe_v1", "embedding_probe_v1"])
def test_a_probe_folder_of_the_earlier_format_loads_and_scores_the_same(name):
    expected = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    clf = load_classifier(str(FIXTURES / name), device="cpu")
    assert clf.labels == ["sarcasm", "humor", "remorse", "loving"]
    got = clf.predict(expected["texts"], max_length=64)
    for (label, probs), (want_label, want_probs) in zip(got, expected["predictions"], strict=True):
        assert label == want_label
        assert probs == pytest.approx(want_probs, abs=1e-6)
    assert len({label for label, _ in got}) > 2  # the recorded predictions are not one label
    # the same provenance, so the same score id (`ScoreRow.classifier`) as before the move
    old = {**expected["identity"], "source": clf.source}
    assert clf.provenance == old
    assert clf.identity == stable_hash(old, 12)
