"""Store fuzzer: random damage to random lines of each table, then open it.

Each case writes a table of random records, damages it (truncated lines, byte flips, inserted
garbage, deleted newlines, duplicated lines with the same or different content, invalid UTF-8, a
cut-off end), and checks against what the test knows it did:
  - a reader changes no byte and no file, keeps every undamaged line's record, and accounts for
    every line (kept, or reported as damaged with its line number);
  - every line that is not a valid record (judged here, line by line) is reported;
  - a writer then sets every reported line aside verbatim: the table plus the quarantine hold
    exactly the lines of the damaged file, no good line is lost, and the table is clean after.
Seeded: CHARSHIFT_FUZZ_SEED / CHARSHIFT_FUZZ_CASES change the seed and the number of cases.
"""

import json
import os
import random
from collections import Counter

import pytest

from charshift.schema import GenerationRow, RecordError, ScoreRow
from charshift.store import JsonlTable, RunStore, quarantine_path, read_quarantine

SEED = int(os.environ.get("CHARSHIFT_FUZZ_SEED", "0"))
CASES = int(os.environ.get("CHARSHIFT_FUZZ_CASES", "250"))
ALPHABET = 'abc xyz"\\/{}[],:é漢😀\t'

GARBAGE = [
    b"null",
    b"[]",
    b"{}",
    b"42",
    b'"a string"',
    b'{"key": "only-a-key"}',
    b'{"key": 7, "classifier": "c"}',
    b"{",
    b'{"key": "x", "base": ',
    b"\x00\x01\x02",
    b"not json at all",
    b"\xef\xbb\xbf{}",
]


def _text(rng):
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 30)))


def _generation(rng, i):
    return GenerationRow(
        key=f"k{i:04d}", base="b", stage=rng.choice(["base", "prompted"]),
        persona=rng.choice([None, "humor"]), slice="id_chat", item_id=f"p{i}",
        sample_idx=rng.randint(0, 3), split="eval", seed=rng.randint(0, 2**31),
        outcome="reply", messages=[{"role": "assistant", "content": _text(rng)}],
        final_reply=_text(rng), text=rng.choice([None, _text(rng)]),
        meta={"n": rng.random()},
    )  # fmt: skip


def _score(rng, i):
    probs = {"humor": rng.random(), "sarcasm": rng.random()}
    return ScoreRow(f"k{i // 2:04d}", f"c{i % 2}", "text", rng.choice(list(probs)), probs)


KINDS = {
    "generations": (GenerationRow, ("key",), _generation),
    "scores": (ScoreRow, ("key", "classifier"), _score),
}


def _encode(row):
    return json.dumps(row.to_dict(), ensure_ascii=False).encode("utf-8")


def _damage(rng, lines):
    """Apply 1-6 random damages. Returns (segments, cut_end): each segment is [bytes, origin],
    origin the index of the original line it still is verbatim, or None."""
    segs = [[line, i] for i, line in enumerate(lines)]
    cut_end = False
    for _ in range(rng.randint(1, 6)):
        op = rng.choice(
            ["truncate", "flip", "garbage", "join", "dup", "conflict", "utf8", "cut_end"]
        )
        j = rng.randrange(len(segs))
        raw = segs[j][0]
        if op == "truncate" and len(raw) > 1:
            segs[j] = [raw[: rng.randrange(1, len(raw))], None]
        elif op == "flip" and raw:
            k = rng.randrange(len(raw))
            segs[j] = [raw[:k] + bytes([raw[k] ^ rng.randint(1, 255)]) + raw[k + 1 :], None]
        elif op == "garbage":
            segs.insert(j, [rng.choice(GARBAGE), None])
        elif op == "join" and j + 1 < len(segs):
            segs[j : j + 2] = [[raw + segs[j + 1][0], None]]
        elif op == "dup":
            segs.insert(j + 1, [raw, None])
        elif op == "conflict" and segs[j][1] is not None:
            twin = json.loads(raw)
            twin["final_reply" if "final_reply" in twin else "prediction"] = "changed"
            segs.insert(j + 1, [json.dumps(twin, ensure_ascii=False).encode(), None])
        elif op == "utf8" and raw:
            k = rng.randrange(len(raw))
            segs[j] = [raw[:k] + rng.choice([b"\xff", b"\xc3(", b"\xed\xa0\x80"]) + raw[k:], None]
        elif op == "cut_end":
            last = segs[-1]
            if len(last[0]) > 1:
                segs[-1] = [last[0][: rng.randrange(1, len(last[0]))], None]
                cut_end = True
    return segs, cut_end


def _valid(raw, record_type):
    """This test's own judgement of one line: a record, or None."""
    try:
        obj = json.loads(raw.decode("utf-8"))
        return record_type.from_dict(obj) if isinstance(obj, dict) else None
    except (UnicodeDecodeError, ValueError, RecordError, RecursionError):
        return None


def _one_case(tmp_path, seed, kind):
    rng = random.Random(seed)
    record_type, key_fields, make = KINDS[kind]
    originals = [make(rng, i) for i in range(rng.randint(3, 25))]
    lines = [_encode(r) for r in originals]
    segs, cut_end = _damage(rng, lines)
    blob = b"\n".join(s[0] for s in segs) + (b"" if cut_end else b"\n")
    folder = tmp_path / f"{kind}-{seed}"
    folder.mkdir()
    path = folder / f"{kind}.jsonl"
    path.write_bytes(blob)
    physical = [(n, raw) for n, raw in enumerate(blob.split(b"\n"), 1) if raw.strip()]
    intact = [originals[s[1]] for s in segs if s[1] is not None]
    where = f"seed {seed} ({kind})"

    def key(r):
        return tuple(getattr(r, f) for f in key_fields)

    # a reader: no change, every undamaged record kept, every line accounted for
    mtime = path.stat().st_mtime_ns
    reader = JsonlTable(path, record_type, key_fields, writable=False)
    assert path.read_bytes() == blob and path.stat().st_mtime_ns == mtime, where
    assert sorted(p.name for p in folder.iterdir()) == [path.name], where
    for r in intact:
        assert reader.get(key(r)) == r, where
    assert len(reader) + len(reader.found) == len(physical), where
    reported = {d.line: d.raw for d in reader.found}
    for n, raw in physical:
        if _valid(raw, record_type) is None:
            assert reported.get(n) == raw, f"{where}: line {n} not reported"

    # a writer: sets aside exactly what the reader reported, loses nothing, leaves a clean table
    writer = JsonlTable(path, record_type, key_fields)
    assert {d.line: d.raw for d in writer.set_aside} == reported, where
    kept = path.read_bytes().splitlines()
    aside = [d.raw for d in read_quarantine(quarantine_path(path))] if reported else []
    assert Counter(kept + aside) == Counter(raw for _, raw in physical), where
    assert [_valid(x, record_type) for x in kept] == writer.rows(), where
    again = JsonlTable(path, record_type, key_fields, writable=False)
    assert not again.found and again.rows() == writer.rows(), where
    # what was lost to damage is redone: append the originals, each key once
    writer.append(originals)
    final = JsonlTable(path, record_type, key_fields, writable=False)
    assert not final.found and {key(r) for r in final} >= {key(r) for r in originals}, where
    return len(reported)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fuzzed_tables_lose_no_good_line(tmp_path, kind):
    damaged = sum(_one_case(tmp_path, SEED * 100_000 + i, kind) for i in range(CASES))
    assert damaged > CASES  # the damage really produced damaged lines, many of them


def test_fuzzed_shard_files_are_read_as_one_table(tmp_path):
    """Damage in two shards' files: a reader sees the union; each shard's writer repairs only
    its own file, and the union after both repairs holds every undamaged row."""
    for case in range(20):
        rng = random.Random(SEED * 1000 + case)
        root = tmp_path / f"run{case}"
        intact = []
        with RunStore(root, warn=lambda _m: None) as s:
            s.write_config({"name": "fuzz"})
        for i in (0, 1):
            rows = [_generation(rng, 100 * i + j) for j in range(rng.randint(3, 12))]
            segs, cut_end = _damage(rng, [_encode(r) for r in rows])
            blob = b"\n".join(x[0] for x in segs) + (b"" if cut_end else b"\n")
            (root / f"generations.shard-{i}-of-2.jsonl").write_bytes(blob)
            intact += [rows[x[1]] for x in segs if x[1] is not None]
        before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
        union = RunStore(root, writable=False, warn=lambda _m: None).generations
        assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before
        for r in intact:
            assert union.get(r.key) == r
        for i in (0, 1):
            RunStore(root, shard=(i, 2), warn=lambda _m: None).close()
        repaired = RunStore(root, writable=False, warn=lambda _m: None).generations
        assert not repaired.found
        assert all(repaired.get(r.key) == r for r in intact)
