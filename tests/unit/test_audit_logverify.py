"""Issue 19 (2): the audit stream read back from logs and verified (`sidecar.audit.logs`,
`sidecar.audit.logverify`), with plain data: chains made with the record functions, framed
as `kubectl logs`, the kubelet's CRI log files or Docker's json-file keep them, with
mandate's own log lines in between.

Each case names what the verifier must say: an intact stream is ok whatever the framing
(long lines split into CRI ``P`` parts, stderr lines between the parts, rotated and gzipped
files); a missing line is a seq_gap, an edited one a hash_mismatch, swapped lines are
reordered, a cut tail before a restart is missing_tail; a restart is a new chain whose
header names the last record of the one before; a line that merely contains a record (a log
message quoting one) is no record, and neither is a record-like line on stderr."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit import chained_line, decision_line, genesis
from sidecar.audit.logs import LogLine, log_lines
from sidecar.audit.logverify import LogVerifyResult, verify_lines, verify_log
from sidecar.audit.record import MARKER_PREFIX, canonical_json, link, stream_stamp
from sidecar.core import Code, Decision
from sidecar.errors import AuditInputError

NOW = 1_700_000_000.0
T = "2023-11-14T22:13:20.000Z"
A, B, C = "pod-1-w0-aaaaaaaa", "pod-1-w0-bbbbbbbb", "pod-1-supervisor-cccccccc"
LOG = b"2023-11-14 22:13:20,000 INFO sidecar.run.worker: mandate serving: {}"


def dec(i: int, path: str = "") -> Decision:
    return Decision(
        f"d{i:04d}", i % 3 != 0, Code.ALLOWED if i % 3 else Code.OUTSIDE_PURPOSE, "because",
        "billing-agent", "finance", "billing", "", "r1", "sidecar-config", "GET",
        "api.example.com", 443, path or f"/v1/items/{i}", (), "",
    )  # fmt: skip


def chain(
    chain_id: str,
    n: int = 4,
    *,
    previous: dict[str, Any] | None = None,
    end: bool = True,
    path: str = "",
    writer: str = "w0",
) -> list[bytes]:
    """The lines (without newlines) of a stream chain: its header, ``n`` decisions, an end."""
    stamp = stream_stamp(chain_id)
    header = {
        "type": "header", "format": 1, "sink": "stdout", "writer": writer, "pod": "pod-1",
        "pid": 7, "previous": previous, "time": T,
    }  # fmt: skip
    line, prev = chained_line({**header, **stamp}, seq=0, prev=genesis(chain_id))
    out = [line]
    for i in range(n):
        line, prev = decision_line(
            dec(i, path), pod="pod-1", namespace="agents", now=NOW + i, seq=i + 1, prev=prev,
            chain=chain_id,
        )  # fmt: skip
        out.append(line)
    if end:
        line, prev = chained_line({"type": "end", "time": T, **stamp}, seq=n + 1, prev=prev)
        out.append(line)
    return [raw.rstrip(b"\n") for raw in out]


def head(lines: list[bytes]) -> dict[str, Any]:
    last = json.loads(lines[-1])
    return {"chain": last["chain"], "seq": last["seq"], "hash": last["hash"]}


def raw(lines: list[bytes]) -> list[LogLine]:
    return [LogLine("log", i, text) for i, text in enumerate(lines, 1)]


def check(lines: list[bytes]) -> LogVerifyResult:
    return verify_lines(raw(lines))


def kinds(result: LogVerifyResult) -> list[tuple[str, str]]:
    out = [(c.chain, c.problem.kind) for c in result.chains if c.problem is not None]
    return out + [("", p.kind) for p in result.problems]


# -- intact streams ---------------------------------------------------------------------------


def test_an_intact_stream_with_log_lines_between_the_records() -> None:
    a, c = chain(A), chain(C, 2, writer="supervisor")
    mixed = [LOG, a[0], c[0], a[1], LOG, a[2], c[1], c[2], a[3], a[4], LOG, c[3], a[5]]
    r = check(mixed)
    assert r.ok, r.to_json()
    assert [(x.chain, x.records, x.first_seq, x.last_seq, x.ended) for x in r.chains] == [
        (A, 4, 0, 5, True), (C, 2, 0, 3, True),
    ]  # fmt: skip
    assert r.record_lines == 10 and r.lines == 13
    assert r.chains[0].writer == "w0" and r.chains[0].pid == 7


def test_a_restart_is_a_new_chain_that_names_the_last_record_of_the_one_before() -> None:
    a = chain(A, end=False)  # killed: no end record
    b = chain(B, previous=head(a))
    r = check([*a, LOG, *b])
    assert r.ok, r.to_json()
    first, second = r.chains
    assert first.successor == B and not first.ended
    assert second.previous == head(a)
    assert any(f"follows chain {A}, which reaches seq 4" in n for n in second.notes)
    assert any("a new chain" in n for n in first.notes)


def test_a_chain_the_log_window_starts_inside_is_incomplete_unless_partial_is_allowed() -> None:
    """Review of issue 19 (10): an agent floods cheap denied calls until the kubelet rotates
    mandate's log away; `kubectl logs` then starts inside the chains, the record the agent
    wanted hidden is gone, and verify said ok (a note). Now intact but not complete (the CLI
    exits 3), unless the operator says the log is a window on purpose."""
    a = chain(A, 20, end=False)
    r = check(a[8:])
    assert not r.ok and r.intact and not r.complete, r.to_json()
    assert kinds(r) == [] and r.problem is not None and r.problem.kind == "missing_head"
    (c,) = r.chains
    assert c.incomplete is not None and (c.incomplete.seq, c.incomplete.line) == (8, 1)
    assert (c.first_seq, c.first_time) == (8, json.loads(a[8])["time"])
    assert r.to_json()["complete"] is False and r.to_json()["chains"][0]["incomplete"]
    r = verify_lines(raw(a[8:]), allow_partial=True)
    assert r.ok and r.chains[0].first_seq == 8 and r.chains[0].incomplete is None
    assert any("begins inside this chain, at seq 8" in n for n in r.chains[0].notes)
    # Tampering still wins over a window: a gap inside what the log holds.
    r = verify_lines(raw(a[8:12] + a[13:]), allow_partial=True)
    assert kinds(r) == [(A, "seq_gap")] and not r.intact


def test_a_restart_whose_previous_chain_is_not_in_the_log_is_incomplete() -> None:
    """The records of the chain before a restart are gone from the log (rotated away, or
    the previous container's log not given): the new chain's header names it."""
    a = chain(A, end=False)
    b = chain(B, previous=head(a))
    r = check(b)
    assert r.intact and not r.complete
    assert r.problem is not None and (r.problem.kind, r.problem.chain) == ("missing_previous", B)
    r = verify_lines(raw(b), allow_partial=True)
    assert r.ok and any(f"follows chain {A}" in n for n in r.chains[0].notes)
    assert check([*a, *b]).ok  # both there: complete
    assert check(chain(A)).ok  # a new chain (previous null) starts the story


def test_a_duplicated_line_is_a_note() -> None:
    a = chain(A)
    r = check([*a[:3], a[2], *a[3:]])
    assert r.ok, r.to_json()
    assert any("a duplicate of seq 2" in n for n in r.chains[0].notes)


# -- what verification catches ----------------------------------------------------------------


def test_a_missing_line_is_a_seq_gap() -> None:
    a = chain(A)
    r = check(a[:2] + a[3:])
    assert kinds(r) == [(A, "seq_gap")]
    assert r.problem is not None and (r.problem.line, r.problem.seq) == (3, 3)


def test_an_edited_record_is_a_hash_mismatch() -> None:
    a = chain(A)
    a[2] = a[2].replace(b'"decision":"allow"', b'"decision":"deny"')
    assert kinds(check(a)) == [(A, "hash_mismatch")]


def test_an_edited_and_rehashed_record_breaks_the_next_link() -> None:
    a = chain(A)
    rec = json.loads(a[2])
    rec["path"] = "/v1/innocent"
    a[2] = canonical_json(link(rec, seq=rec["seq"], prev=rec["prev"]))
    r = check(a)
    assert kinds(r) == [(A, "prev_mismatch")] and r.problem is not None and r.problem.seq == 3


def test_swapped_lines_are_reordered() -> None:
    a = chain(A)
    r = check([a[0], a[1], a[3], a[2], a[4], a[5]])
    assert kinds(r) == [(A, "reordered")]


def test_a_forged_record_in_the_chain_is_caught() -> None:
    """A record made up with a valid hash for a seq the chain already has."""
    a = chain(A)
    forged = json.loads(a[2])
    forged["decision"] = "allow"
    forged["path"] = "/v1/forged"
    forged_line = canonical_json(link(forged, seq=forged["seq"], prev=forged["prev"]))
    assert kinds(check([*a[:3], forged_line, *a[3:]])) == [(A, "reordered")]


def test_a_cut_tail_before_a_restart_is_missing_tail() -> None:
    a = chain(A, end=False)
    b = chain(B, previous=head(a))
    r = check(a[:-2] + b)  # the last two records of A are gone; B says A reached seq 4
    assert kinds(r) == [(A, "missing_tail")], r.to_json()
    assert r.problem is not None and r.problem.seq == 4


def test_a_successor_naming_another_record_is_a_link_mismatch() -> None:
    a = chain(A, end=False)
    wrong = {**head(a), "hash": "0" * 64}
    assert kinds(check(a + chain(B, previous=wrong))) == [(B, "link_mismatch")]


def test_a_header_inside_a_chain_and_a_record_after_its_end() -> None:
    a = chain(A)
    rec = json.loads(a[0])
    fake = canonical_json(link({**rec, "time": "later"}, seq=6, prev=json.loads(a[-1])["hash"]))
    assert kinds(check([*a, fake])) == [(A, "bad_header")]
    after = {**json.loads(a[1]), "decision_id": "late"}
    late = canonical_json(link(after, seq=6, prev=json.loads(a[-1])["hash"]))
    assert kinds(check([*a, late])) == [(A, "bad_record")]


def test_a_first_record_that_does_not_start_from_the_genesis() -> None:
    a = chain(A)
    rec = json.loads(a[0])
    other = canonical_json(link(rec, seq=0, prev="1" * 64))
    assert kinds(check([other])) == [(A, "prev_mismatch")]


# -- a line must BE a record ------------------------------------------------------------------


def test_a_log_line_that_quotes_a_record_is_not_one() -> None:
    """mandate logging an agent's text that holds a record: the line contains a record but
    is a log line; it must not count (here it would fork the chain: seq 2 twice)."""
    a = chain(A)
    forged = json.loads(a[2])
    forged["path"] = "/v1/forged"
    quoted = canonical_json(link(forged, seq=forged["seq"], prev=forged["prev"]))
    log_line = b"2023-11-14 22:13:20,000 INFO sidecar.run: task: " + quoted
    r = check([*a[:3], log_line, b"   " + quoted, *a[3:]])
    assert r.ok, r.to_json()
    assert r.record_lines == len(a)


def test_a_record_like_line_on_stderr_is_not_one(tmp_path: Path) -> None:
    a = chain(A)
    forged = json.loads(a[2])
    forged["path"] = "/v1/forged"
    quoted = canonical_json(link(forged, seq=forged["seq"], prev=forged["prev"]))
    cri = [cri_line(x) for x in a[:3]] + [cri_line(quoted, stream="stderr")]
    cri += [cri_line(x) for x in a[3:]]
    path = tmp_path / "0.log"
    path.write_bytes(b"".join(cri))
    r = verify_log([str(path)])
    assert r.ok, r.to_json()
    assert any("on stderr start like records" in n for n in r.notes)


def test_a_reencoded_line_is_not_the_record() -> None:
    a = chain(A)
    spaced = json.dumps(json.loads(a[2]), sort_keys=True, ensure_ascii=False).encode()
    r = check([*a[:2], spaced, *a[3:]])
    assert kinds(r) == [(A, "seq_gap")]  # not a record line: seq 2 is missing
    r = check([*a[:2], a[2] + b" ", *a[3:]])
    assert ("", "not_canonical") in kinds(r)


def test_a_torn_line_is_a_problem_unless_a_writer_recorded_ending_it() -> None:
    a = chain(A, end=False)
    torn = a[-1][: len(a[-1]) // 2]
    assert kinds(check([*a[:-1], torn])) == [("", "torn_line")]
    stamp = stream_stamp(C)
    c = chain(C, 1, writer="supervisor", end=False)
    recovered = {
        "type": "recovered", "time": T, "torn_line": True, "torn_by": A, "what": "...", **stamp,
    }  # fmt: skip
    line, _ = chained_line(recovered, seq=2, prev=json.loads(c[-1])["hash"])
    r = check([*a[:-1], torn, *c, line.rstrip(b"\n")])
    assert r.ok, r.to_json()
    assert any("a torn line, ended by" in n for n in r.notes)


# -- whose lines: only mandate's container writes records ------------------------------------


def test_records_printed_by_the_agent_container_are_not_accepted(tmp_path: Path) -> None:
    """Review of issue 19 (9): `kubectl logs POD --all-containers --prefix` (or a log query
    by pod) interleaves the agent's stdout; the agent prints a whole chain of its own (the
    chain is unkeyed: anyone can compute header, seq, prev and hash) and verify took it for
    mandate's, with the real one, exit 0."""
    real = chain("agent-1-w0-0a1b2c3d", 2)
    forged = chain("agent-1-w0-deadbeef", 3)  # e.g. "deny" for calls that were made
    data = b"".join(
        [b"[pod/agent-1/mandate] " + t + b"\n" for t in [LOG, *real]]
        + [b"[pod/agent-1/agent] 2026-01-01T00:00:00Z " + t + b"\n" for t in forged]
    )
    (tmp_path / "all.log").write_bytes(data)
    r = verify_log([str(tmp_path / "all.log")])
    assert not r.ok and not r.intact
    assert [c.chain for c in r.chains] == ["agent-1-w0-0a1b2c3d"] and r.chains[0].ok
    assert kinds(r) == [("", "foreign_container")]
    assert r.problem is not None and r.problem.line == 6 and "5 line(s)" in r.problem.message
    assert r.trusted_sources == ()  # every record's container was named
    # A renamed container: --container.
    r = verify_log([str(tmp_path / "all.log")], container="agent")
    assert [c.chain for c in r.chains] == ["agent-1-w0-deadbeef"]
    assert kinds(r) == [("", "foreign_container")]


def test_a_cri_directory_of_another_container_is_not_taken_for_mandates(tmp_path: Path) -> None:
    """/var/log/pods/NS_POD_UID/agent/0.log: the agent's stdout, CRI-framed, on stdout;
    also the /var/log/containers/POD_NS_CONTAINER-ID.log links to it."""
    forged = chain("agent-1-w0-deadbeef", 3)
    d = tmp_path / "agents_agent-1_0d7c-uid" / "agent"
    d.mkdir(parents=True)
    d.joinpath("0.log").write_bytes(b"".join(cri_line(t) for t in forged))
    for source in (d, d / "0.log"):
        r = verify_log([str(source)])
        assert not r.ok and not r.chains and kinds(r) == [("", "foreign_container")]
    link = tmp_path / f"agent-1_agents_agent-{'ab' * 32}.log"
    link.symlink_to(d / "0.log")
    assert kinds(verify_log([str(link)])) == [("", "foreign_container")]
    # mandate's own directory and link verify, and no note says they were trusted.
    m = tmp_path / "agents_agent-1_0d7c-uid" / "mandate"
    m.mkdir()
    m.joinpath("0.log").write_bytes(cri([LOG, *chain(A)]))
    mlink = tmp_path / f"agent-1_agents_mandate-{'cd' * 32}.log"
    mlink.symlink_to(m / "0.log")
    for source in (m, mlink):
        r = verify_log([str(source)])
        assert r.ok and r.trusted_sources == () and not r.notes, r.to_json()
    # The same file elsewhere (copied off the node): its path names no container.
    (tmp_path / "copy.log").write_bytes((d / "0.log").read_bytes())
    r = verify_log([str(tmp_path / "copy.log")])
    assert r.ok and r.trusted_sources == (str(tmp_path / "copy.log"),)


def test_a_source_that_does_not_name_the_container_is_trusted_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "mandate.log").write_bytes(b"".join(t + b"\n" for t in [LOG, *chain(A)]))
    r = verify_log([str(tmp_path / "mandate.log")])
    assert r.ok and r.trusted_sources == (str(tmp_path / "mandate.log"),)
    assert any("trusted to come from container 'mandate'" in n for n in r.notes), r.notes
    assert r.to_json()["trusted_sources"] == [str(tmp_path / "mandate.log")]


def test_a_prefix_inside_a_named_containers_text_does_not_name_the_container(
    tmp_path: Path,
) -> None:
    """The agent's own text in its CRI file, framed as `kubectl logs --prefix` would frame
    mandate's: the path names the container, whatever the text says."""
    forged = chain("agent-1-w0-deadbeef", 1)
    d = tmp_path / "agents_agent-1_0d7c-uid" / "agent"
    d.mkdir(parents=True)
    d.joinpath("0.log").write_bytes(b"".join(b"[pod/agent-1/mandate] " + t + b"\n" for t in forged))
    lines = list(log_lines([str(d)]))
    assert {x.container for x in lines} == {"agent"}
    assert kinds(verify_log([str(d)])) == [("", "foreign_container")]


# -- framings ---------------------------------------------------------------------------------


def cri_line(text: bytes, stream: str = "stdout", tag: str = "F", ts: str = "") -> bytes:
    stamp = ts or "2023-11-14T22:13:20.123456789Z"
    return f"{stamp} {stream} {tag} ".encode() + text + b"\n"


def cri(lines: list[bytes], part: int = 0, stderr_between: bool = True) -> bytes:
    """``lines`` as containerd writes them: lines longer than ``part`` in P parts, and
    mandate's stderr lines between the parts (the two streams interleave)."""
    out = []
    for text in lines:
        stream = "stdout" if text.startswith(MARKER_PREFIX) else "stderr"
        pieces = [text[i : i + part] for i in range(0, len(text), part)] if part else [text]
        for j, piece in enumerate(pieces):
            last = j == len(pieces) - 1
            out.append(cri_line(piece, stream, "F" if last else "P"))
            if not last and stderr_between and j == 0:
                out.append(cri_line(LOG, "stderr"))
    return b"".join(out)


def test_cri_partial_lines_are_joined(tmp_path: Path) -> None:
    long_path = "/v1/" + "x" * 40_000  # beyond containerd's 16 KiB line limit
    a = chain(A, path=long_path)
    path = tmp_path / "0.log"
    path.write_bytes(cri([LOG, *a], part=16 * 1024))
    assert b" stdout P " in path.read_bytes()
    r = verify_log([str(path)])
    assert r.ok, r.to_json()
    assert r.chains[0].records == 4


def test_a_cri_directory_with_rotated_gzipped_files_and_a_restart(tmp_path: Path) -> None:
    """The kubelet's directory of one container: rotated (and gzipped) files before the
    live one, then the next container's file after a restart (`N.log`). A long line split
    across a rotation is joined; one left open when the container changed is torn."""
    a = chain(A, 6, end=False, path="/v1/" + "y" * 100)
    b = chain(B, previous=head(a))
    whole = cri(a, part=64, stderr_between=False).splitlines(keepends=True)
    cut = next(i for i, x in enumerate(whole) if b" P " in x and i > 5)
    (tmp_path / "0.log.20231114-221320.gz").write_bytes(gzip.compress(b"".join(whole[: cut + 1])))
    (tmp_path / "0.log").write_bytes(b"".join(whole[cut + 1 :]))
    (tmp_path / "1.log").write_bytes(cri([LOG, *b]))
    (tmp_path / "unrelated.txt").write_text("not a log\n")
    r = verify_log([str(tmp_path)])
    assert r.ok, r.to_json()
    assert [c.chain for c in r.chains] == [A, B] and r.chains[1].previous == head(a)
    # A part never closed before the container changed: a torn line.
    (tmp_path / "0.log").write_bytes(b"".join(whole[cut + 1 : -1]))
    r = verify_log([str(tmp_path)])
    assert ("", "torn_line") in kinds(r)


@pytest.mark.parametrize("framing", ["raw", "timestamps", "prefix", "docker", "cri"])
def test_framings(tmp_path: Path, framing: str) -> None:
    a = chain(A)
    texts = [LOG, *a[:3], LOG, *a[3:]]
    if framing == "raw":
        data = b"".join(t + b"\n" for t in texts)
    elif framing == "timestamps":  # kubectl logs --timestamps
        data = b"".join(b"2023-11-14T22:13:20.123456789Z " + t + b"\n" for t in texts)
    elif framing == "prefix":  # kubectl logs --prefix --timestamps
        data = b"".join(b"[pod/p-1/mandate] 2023-11-14T22:13:20Z " + t + b"\n" for t in texts)
    elif framing == "docker":  # json-file, long lines in 100-byte parts
        rows = []
        for t in texts:
            stream = "stdout" if t.startswith(MARKER_PREFIX) else "stderr"
            text = t.decode() + "\n"
            for i in range(0, len(text), 100):
                rows.append(json.dumps({"log": text[i : i + 100], "stream": stream, "time": T}))
        data = "".join(r + "\n" for r in rows).encode()
    else:
        data = cri(texts, part=100)
    (tmp_path / "log").write_bytes(data)
    r = verify_log([str(tmp_path / "log")])
    assert r.ok, r.to_json()
    assert r.chains[0].records == 4 and r.record_lines == len(a)


def test_the_last_line_without_its_newline_is_torn(tmp_path: Path) -> None:
    a = chain(A)
    (tmp_path / "log").write_bytes(b"\n".join(a))  # no newline after the end record
    lines = list(log_lines([str(tmp_path / "log")]))
    assert [x.complete for x in lines] == [True] * (len(a) - 1) + [False]
    assert kinds(verify_log([str(tmp_path / "log")])) == [("", "torn_line")]


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(AuditInputError, match="no such file"):
        verify_log([str(tmp_path / "missing")])
    (tmp_path / "log").write_bytes(LOG + b"\n")
    with pytest.raises(AuditInputError, match="no audit records"):
        verify_log([str(tmp_path / "log")])
    (tmp_path / "d").mkdir()
    with pytest.raises(AuditInputError, match="no container log files"):
        verify_log([str(tmp_path / "d")])
    (tmp_path / "log").write_bytes(b"\n".join(chain(A)) + b"\n")
    with pytest.raises(AuditInputError, match="no records of chain"):
        verify_log([str(tmp_path / "log")], "other")
    assert verify_log([str(tmp_path / "log")], A).ok
