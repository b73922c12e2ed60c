"""The `mandate` command line: exit codes, JSON output, errors that name what is wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import main

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "devstack" / "demo" / "profiles"
LEDGER = "http://ledger.finance.svc.cluster.local"


def _explain(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    code = main(["explain", "--profiles", str(PROFILES), *args])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.mark.parametrize("command", [[], ["run"], ["validate"], ["explain"], ["schema"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: mandate" in result.stdout


def test_console_script_is_installed() -> None:
    script = shutil.which("mandate", path=str(Path(sys.executable).parent))
    assert script is not None
    result = subprocess.run(
        [script, "validate", str(PROFILES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "billing-agent" in result.stdout


@pytest.mark.parametrize(
    ("args", "exit_code", "decision", "rule", "purpose"),
    [
        (["--agent", "billing-agent", "GET", f"{LEDGER}/v1/invoices/42"], 0, "allow", "reconcile.allow[0]", "reconcile"),
        (["--agent", "billing-agent", "GET", f"{LEDGER}/v1/ledger/admin/x"], 1, "deny", "reconcile.deny[0]", "reconcile"),
        (["--agent", "billing-agent", "DELETE", f"{LEDGER}/v1/invoices/42"], 1, "deny", None, "reconcile"),
        (
            ["--agent", "billing-agent", "--purpose", "report", "--task", "t-1", "POST",
             "http://reports.finance.svc.cluster.local/v1/reports/nov"],
            0, "allow", "report.allow[0]", "report",
        ),
        (["--agent", "billing-agent", "--purpose", "nope", "GET", f"{LEDGER}/v1/invoices/1"], 1, "deny", None, None),
        (["--service-account", "agents/research-agent", "GET", "http://export.arxiv.org/a"], 0, "allow",
         "literature-search.allow[0]", "literature-search"),
        (["--spiffe", "spiffe://cluster.local/ns/agents/sa/billing-agent", "GET", f"{LEDGER}/v1/invoices/1"],
         0, "allow", "reconcile.allow[0]", "reconcile"),
        (["--agent", "billing-agent", "--spiffe", "spiffe://cluster.local/ns/x/sa/other", "GET",
          f"{LEDGER}/v1/invoices/1"], 1, "deny", None, None),
        (["--agent", "billing-agent", "--header", "x-mandate-agent=research-agent", "GET",
          "http://export.arxiv.org/a"], 1, "deny", None, "reconcile"),
        (
            ["--agent", "research-agent", "--purpose", "tool-use", "--body",
             '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"fetch_abstract"}}',
             "POST", "http://mcp.tools.svc.cluster.local/mcp"],
            0, "allow", "tool-use.allow[0]", "tool-use",
        ),
        (
            ["--agent", "research-agent", "--purpose", "tool-use", "--body",
             '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"drop"}}',
             "POST", "http://mcp.tools.svc.cluster.local/mcp"],
            1, "deny", None, "tool-use",
        ),
    ],
)  # fmt: skip
def test_explain(
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    exit_code: int,
    decision: str,
    rule: str | None,
    purpose: str | None,
) -> None:
    code, out = _explain(capsys, *args)
    assert code == exit_code
    assert out["decision"] == decision
    assert out["rule"] == rule
    assert out["purpose"] == purpose
    assert isinstance(out["reason"], str) and out["reason"]


def test_explain_body_from_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    body = tmp_path / "call.json"
    body.write_text(
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_papers"}}'
    )
    code, out = _explain(
        capsys, "--agent", "research-agent", "--purpose", "tool-use", "--body", f"@{body}",
        "POST", "http://mcp.tools.svc.cluster.local/mcp",
    )  # fmt: skip
    assert (code, out["decision"], out["mcp_tools"]) == (0, "allow", ["search_papers"])


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--agent", "billing-agent", "GET", "ledger/v1/x"], "absolute http"),
        (["--agent", "billing-agent", "GET", "ftp://ledger/v1/x"], "absolute http"),
        (["--agent", "billing-agent", "--header", "novalue", "GET", f"{LEDGER}/x"], "NAME=VALUE"),
        (["--agent", "nobody", "GET", f"{LEDGER}/x"], "no such profile"),
        (["GET", f"{LEDGER}/x"], "who is calling"),
        (["--agent", "billing-agent", "CONNECT", "api.stripe.com"], "HOST:PORT"),
        (["--agent", "billing-agent", "--body", "@/nonexistent/file", "POST", f"{LEDGER}/x"], "/nonexistent/file"),
    ],
)  # fmt: skip
def test_explain_bad_input_exits_2(
    capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    code = main(["explain", "--profiles", str(PROFILES), *args])
    captured = capsys.readouterr()
    assert code == 2
    assert json.loads(captured.out)["error"] == "bad_input"
    assert fragment in captured.err


def test_explain_with_invalid_profiles_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "bad.yaml").write_text("apiVersion: mandate.dev/v1alpha1\nkind: AgentProfile\n")
    code = main(["explain", "--profiles", str(tmp_path), "--agent", "a", "GET", "http://x/"])
    captured = capsys.readouterr()
    assert code == 2
    problems = json.loads(captured.out)["problems"]
    assert any("bad.yaml, document 1, metadata" in p for p in problems)


def test_validate_reports_every_problem(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = (PROFILES / "agents.yaml").read_text()
    text = text.replace("owner: finance-platform", "ownr: finance-platform")
    text = text.replace('paths: ["/v1/reports/*"]', 'paths: ["v1/reports/*"]')
    (tmp_path / "agents.yaml").write_text(text)
    code = main(["validate", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{tmp_path / 'agents.yaml'}, document 1, spec.ownr: unknown field" in err
    assert f"{tmp_path / 'agents.yaml'}, document 1, spec.owner: required field is missing" in err
    assert (
        "document 1, spec.purposes.report.allow[0].paths[0]: path pattern 'v1/reports/*' must start with '/'"
        in err
    )


def test_validate_ok_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(PROFILES)]) == 0
    assert "2 agent(s)" in capsys.readouterr().out
    assert main(["validate", "--json", str(PROFILES)]) == 0
    assert json.loads(capsys.readouterr().out)["agents"] == ["billing-agent", "research-agent"]


def test_schema_command_prints_the_shipped_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    shipped = json.loads((ROOT / "sidecar" / "schema" / "agentprofile.schema.json").read_text())
    assert printed == shipped


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--listen", "nonsense"], "--listen 'nonsense'"),
        (["--admin", "127.0.0.1:99999"], "--admin"),
        (["--threads", "0"], "--threads 0"),
    ],
)
def test_run_refuses_bad_options(tmp_path: Path, extra: list[str], fragment: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--profiles", str(PROFILES),
         "--admin", "127.0.0.1:0", *extra],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr


def test_run_refuses_invalid_profiles(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("kind: [\n")
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--profiles", str(tmp_path),
         "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{tmp_path / 'a.yaml'}, document 1: invalid YAML" in result.stderr
    assert "refusing to start" in result.stderr


@pytest.mark.parametrize(
    "bad", ["2026-12-01 00:00:00Z", "2026-12-01T00:00:00", "soon", "30 parsecs"]
)
def test_revoke_refuses_an_expiry_that_is_neither_a_duration_nor_rfc3339(
    bad: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    # Refused before any request: the admin address is never contacted.
    code = main(["revoke", "some-agent", "--reason", "r", "--expires", bad,
                 "--admin", "127.0.0.1:9", "--token-file", str(token)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert repr(bad) in err and "RFC 3339" in err


def test_revoke_expiry_forms() -> None:
    from sidecar.cli import _expires
    from sidecar.core.timefmt import parse_rfc3339

    assert _expires("2026-12-01T01:00:00+01:00") == "2026-12-01T01:00:00+01:00"
    assert _expires(" 2026-12-01T00:00:00.5Z ") == "2026-12-01T00:00:00.5Z"
    end = parse_rfc3339(_expires("30m"))
    assert end is not None and _expires("30m").endswith("Z")


class _FailingAdmin:
    """An admin API whose state file cannot be written: every revoke and restore is a 500
    `state_not_durable`, as sidecar/run/admin.py answers it."""

    FILE = "/var/lib/mandate/revocations.json"

    def __init__(self) -> None:
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _fail(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                body = json.dumps(
                    {
                        "error": "state_not_durable",
                        "message": f"cannot write {outer.FILE}: Read-only file system (EROFS)",
                        "file": outer.FILE,
                        "os_error": "Read-only file system (EROFS)",
                    }
                ).encode()
                self.send_response(500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_DELETE = _fail

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    "command", [["revoke", "billing-agent", "--reason", "r"], ["restore", "billing-agent"]]
)
def test_revoke_and_restore_that_are_not_durable_exit_3_with_the_message(
    command: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Issue 15, finding 6: `mandate revoke` said 0 while nothing was persisted. A 5xx is
    the sidecar failing, not the operator's bad input: exit 3, and stderr says why."""
    admin = _FailingAdmin()
    token = tmp_path / "token"
    token.write_text("t" * 32 + "\n")
    try:
        code = main([*command, "--admin", f"127.0.0.1:{admin.port}", "--token-file", str(token)])
    finally:
        admin.close()
    out, err = capsys.readouterr()
    assert code == 3
    assert json.loads(out)["error"] == "state_not_durable"
    assert "HTTP 500" in err and _FailingAdmin.FILE in err and "Read-only file system" in err
