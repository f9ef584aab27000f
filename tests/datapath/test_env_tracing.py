"""Environment files for workers (--env-file, env_file) and W3C trace context (traceparent)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re

import pytest
from conftest import HAVE_R, corral_cli, get, stub_args

from corral import edge
from corral.config.envfile import EnvFileError, parse
from corral.datapath import tracing

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-0[23]")
CLIENT_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


# --- the env file syntax ------------------------------------------------------------------------
@pytest.mark.unit
def test_env_file_syntax():
    text = (
        "# a comment\n"
        "\n"
        "PLAIN=value\n"
        "export EXPORTED=yes\n"
        "SPACED = around the equals  \n"
        "INLINE=kept # a comment after a space\n"
        "HASH=a#b\n"
        "EMPTY=\n"
        "SINGLE='literal $HOME \\n # not a comment'\n"
        'DOUBLE="line1\\nline2 \\"quoted\\" \\\\ $HOME"\n'
        'MULTI="-----BEGIN KEY-----\n'
        "abc\n"
        '-----END KEY-----" # trailing comment\n'
        "DUP=first\n"
        "DUP=second\n"
    )
    assert parse(text, ".env") == {
        "PLAIN": "value",
        "EXPORTED": "yes",
        "SPACED": "around the equals",
        "INLINE": "kept",
        "HASH": "a#b",
        "EMPTY": "",
        "SINGLE": "literal $HOME \\n # not a comment",
        "DOUBLE": 'line1\nline2 "quoted" \\ $HOME',
        "MULTI": "-----BEGIN KEY-----\nabc\n-----END KEY-----",
        "DUP": "second",
    }


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("JUST_A_NAME\n", ".env:1: no '=' in 'JUST_A_NAME'"),
        ("OK=1\n1BAD=x\n", ".env:2: '1BAD' is not a variable name"),
        ("A B=x\n", ".env:1: 'A B' is not a variable name"),
        ('Q="never closed\n', ".env:1: the double quote is never closed"),
        ("Q='x' junk\n", ".env:1: text after the closing quote: 'junk'"),
        ("N=a\x00b\n", ".env:1: NUL byte in the value"),
    ],
)
def test_env_file_errors_name_the_line(text, expected):
    with pytest.raises(EnvFileError) as err:
        parse(text, ".env")
    assert str(err.value) == expected


def test_check_reports_a_bad_env_file_relative_to_the_toml(tmp_path):
    (tmp_path / "prod.env").write_text("GOOD=1\nnot a line\n")
    toml = tmp_path / "corral.toml"
    toml.write_text('[[app]]\nname = "api"\ncommand = ["python3", "x.py"]\nenv_file = "prod.env"\n')
    r = corral_cli("check", "-c", str(toml), cwd="/")
    assert r.returncode == 2
    assert f"app 'api': env_file: {tmp_path / 'prod.env'}:2: no '=' in 'not a line'" in r.stdout + r.stderr
    (tmp_path / "prod.env").unlink()
    r = corral_cli("check", "-c", str(toml), cwd="/")
    assert r.returncode == 2 and "env_file: " in r.stdout + r.stderr and "does not exist" in r.stdout + r.stderr


def test_env_file_with_upstreams_is_refused(tmp_path):
    toml = tmp_path / "corral.toml"
    toml.write_text('[[app]]\nupstreams = ["127.0.0.1:7000"]\nenv_file = "x.env"\n')
    r = corral_cli("check", "-c", str(toml))
    assert r.returncode == 2 and "env_file: has no effect with upstreams" in r.stdout + r.stderr


ENV_APP = """
#* @get /env
function() {
  list(greeting = Sys.getenv("GREETING"), multi = Sys.getenv("MULTI"), table = Sys.getenv("FROM_TABLE"),
       renviron = Sys.getenv("FROM_RENVIRON"), overridden = Sys.getenv("OVERRIDDEN"))
}
"""


@pytest.mark.r
@pytest.mark.skipif(not HAVE_R, reason="R is not installed (scripts/setup installs it)")
def test_env_file_values_reach_r(corral, tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "plumber.R").write_text(ENV_APP)
    (app / ".Renviron").write_text("FROM_RENVIRON=read by R itself\nOVERRIDDEN=by .Renviron\n")
    env = tmp_path / "secrets.env"
    env.write_text("# for the workers\nGREETING='hello, world'\nMULTI=\"a\\nb\"\nOVERRIDDEN=by the env file\n")
    c = corral(["--env-file", "secrets.env", str(app)], workers=1)  # relative to where corral runs
    body = get(c.port, "/env").json()
    assert body["greeting"] == ["hello, world"] and body["multi"] == ["a\nb"]
    # R reads the .Renviron of its working directory (the app's) at startup, after corral set the
    # environment: its values win.
    assert body["renviron"] == ["read by R itself"] and body["overridden"] == ["by .Renviron"]


@pytest.mark.r
@pytest.mark.skipif(not HAVE_R, reason="R is not installed (scripts/setup installs it)")
def test_env_file_in_toml_is_relative_to_it_and_the_env_table_wins(corral, tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "plumber.R").write_text(ENV_APP)
    (conf / "app.env").write_text("GREETING=from the file\nFROM_TABLE=file\n")
    (conf / "corral.toml").write_text(
        '[[app]]\nname = "api"\nplumber = "plumber.R"\nenv_file = "app.env"\nenv = { FROM_TABLE = "table" }\n'
    )
    c = corral(["-c", str(conf / "corral.toml")], workers=1)
    body = get(c.port, "/env").json()
    assert body["greeting"] == ["from the file"] and body["table"] == ["table"]


# --- trace context: the ids -----------------------------------------------------------------------
@pytest.mark.unit
def test_started_traceparent_is_well_formed_and_random():
    tracing.configure(1.0)
    seen = set()
    for _ in range(200):
        tp = tracing.start().decode()
        m = TRACEPARENT.fullmatch(tp)
        assert m and tp.endswith("-03"), tp  # sampled, and the trace id is random (W3C level 2 flag)
        assert tracing.accept(tp.encode()) == tp.encode()
        seen.add(m.group(1))
    assert len(seen) == 200
    tracing.configure(0.0)
    assert tracing.start().endswith(b"-02")
    tracing.configure(1.0)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (CLIENT_TP, True),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", True),
        ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future-fields", True),  # a later version
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", False),  # version 00 is exactly 55
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", False),  # upper case
        ("00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01", False),
        ("garbage", False),
        ("", False),
    ],
)
def test_traceparent_validation(value, ok):
    assert (tracing.accept(value.encode()) is not None) is ok


def head_with(*headers: tuple[bytes, bytes]) -> edge.RequestHead:
    head = edge.RequestHead()
    head.method, head.target, head.host = b"GET", b"/", b"t"
    head.headers = list(headers)
    return head


@pytest.mark.unit
def test_forward_head_sends_one_traceparent_and_tracestate_only_with_the_continued_trace():
    tp = CLIENT_TP.encode()
    head = head_with((b"tracestate", b"a=1"), (b"traceparent", tp), (b"tracestate", b"b=2"))
    out = edge.forward_head(head, b"10.0.0.1", b"rid", True, traceparent=tp)
    assert out.count(b"traceparent:") == 1 and b"\r\ntraceparent: " + tp + b"\r\n" in out
    assert out.count(b"tracestate:") == 1 and b"\r\ntracestate: a=1,b=2\r\n" in out
    new = tracing.start()
    out = edge.forward_head(head, b"10.0.0.1", b"rid", False, traceparent=new)
    assert b"traceparent: " + new in out and tp not in out and b"tracestate" not in out
    out = edge.forward_head(head, b"10.0.0.1", b"rid", True)  # a caller that does not trace: as before
    assert b"traceparent: " + tp in out and b"tracestate: a=1" in out


# --- trace context through corral ---------------------------------------------------------------------
def access_records(c) -> list[dict]:
    return [json.loads(line) for line in c.log().splitlines() if line.startswith('{"time"')]


def test_traceparent_is_generated_when_absent(corral):
    c = corral(stub_args("--access-log", "-", "--log-format", "json"), workers=1)
    r = get(c.port, "/x")
    tp = r.json()["headers"]["traceparent"]
    m = TRACEPARENT.fullmatch(tp)
    assert m, tp
    assert r.header("x-request-id") == m.group(1)  # corral's request id is the trace id
    assert "tracestate" not in r.json()["headers"]
    r2 = get(c.port, "/x")
    assert TRACEPARENT.fullmatch(r2.json()["headers"]["traceparent"]).group(1) != m.group(1)
    c.wait_for('"trace_id"', count=2)
    recs = access_records(c)
    assert [rec["trace_id"] for rec in recs] == [m.group(1), r2.header("x-request-id")]
    assert [rec["request_id"] for rec in recs] == [m.group(1), r2.header("x-request-id")]


def test_trusted_proxy_traceparent_is_propagated_unchanged(corral):
    c = corral(stub_args("--trusted-proxies", "127.0.0.1", "--access-log", "-"), workers=1)
    r = get(c.port, "/x", headers=f"traceparent: {CLIENT_TP}\r\ntracestate: vendor=opaque,other=1\r\n")
    seen = r.json()["headers"]
    assert seen["traceparent"] == CLIENT_TP
    assert seen["tracestate"] == "vendor=opaque,other=1"
    assert r.header("x-request-id") == CLIENT_TRACE
    line = c.wait_for(r'"GET /x" 200 .*').group(0)
    assert f"trace={CLIENT_TRACE}" in line and f"id={CLIENT_TRACE}" in line


def test_trusted_proxy_with_an_invalid_traceparent_gets_a_new_trace(corral):
    c = corral(stub_args("--trusted-proxies", "127.0.0.1"), workers=1)
    bad = "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
    seen = get(c.port, "/x", headers=f"traceparent: {bad}\r\ntracestate: vendor=opaque\r\n").json()["headers"]
    assert TRACEPARENT.fullmatch(seen["traceparent"]) and seen["traceparent"] != bad
    assert "tracestate" not in seen  # W3C: a restarted trace drops the old tracestate


def test_untrusted_client_traceparent_is_replaced(corral):
    # No trusted_proxies: a client may not choose the trace id corral and the app log (W3C's "restart
    # trace" at a front gate); its tracestate belongs to the replaced trace and goes too.
    c = corral(stub_args("--access-log", "-", "--log-format", "json"), workers=1)
    r = get(c.port, "/x", headers=f"traceparent: {CLIENT_TP}\r\ntracestate: vendor=opaque\r\n")
    seen = r.json()["headers"]
    m = TRACEPARENT.fullmatch(seen["traceparent"])
    assert m and m.group(1) != CLIENT_TRACE
    assert "tracestate" not in seen
    c.wait_for('"trace_id"')
    assert access_records(c)[0]["trace_id"] == m.group(1)


def test_client_request_id_is_kept_and_the_trace_id_logged_beside_it(corral):
    c = corral(stub_args("--access-log", "-", "--log-format", "json", "--trusted-proxies", "127.0.0.1"), workers=1)
    r = get(c.port, "/x", headers=f"X-Request-Id: order-42\r\ntraceparent: {CLIENT_TP}\r\n")
    assert r.header("x-request-id") == "order-42"
    assert r.json()["headers"]["x-request-id"] == "order-42"
    c.wait_for('"trace_id"')
    rec = access_records(c)[0]
    assert rec["request_id"] == "order-42" and rec["trace_id"] == CLIENT_TRACE


def test_corral_own_error_answers_carry_the_trace_id(corral):
    # One worker, no queue: of two requests at once, one is refused by corral itself with a 503.
    c = corral(stub_args("--max-queue", "0"), workers=1)
    refused = []
    with cf.ThreadPoolExecutor(1) as pool:
        for _ in range(20):  # bounded: rounds until the two requests overlapped
            slow = pool.submit(get, c.port, "/sleep?s=0.5")
            answers = [get(c.port, "/x")]
            while not slow.done():
                answers.append(get(c.port, "/x"))
            answers.append(slow.result())
            refused = [r for r in answers if r.status == 503]
            if refused:
                break
    assert refused
    assert all(re.fullmatch(r"[0-9a-f]{32}", r.header("x-request-id") or "") for r in refused)


def test_sample_knob_is_bounded(tmp_path):
    r = corral_cli("run", "--trace-sample", "1.5", *stub_args())
    assert r.returncode == 2 and "trace_sample: must be <= 1" in r.stderr
