"""Issue 37, secrets: one masking function (`redaction.redact`) for every URL, DSN and error text the
project records or prints, tested against a corpus of real-world secret shapes; the places that
record such text use it; MLflow server credentials are held for one server at a time.

Each corpus row: the text, the secret pieces that must not survive, the non-secret pieces that must.
"""

import http.server
import json
import os
import random
import string
import threading
from pathlib import Path

import pytest
import yaml

from dfkd_assets.redaction import MASK, redact, split_credentials

ROOT = Path(__file__).resolve().parents[1]

S = "S3cr3tVal"  # the secret part of most rows: grep-able, never a substring of the kept parts

CORPUS = [
    # --- userinfo with any character (issue: a password holding '/' leaked)
    ("postgresql+psycopg2://mlflow:ab/cd@db.example.com:5432/mlflow", ["ab/cd"], ["postgresql+psycopg2://mlflow:", "@db.example.com:5432/mlflow"]),
    (f"postgresql://mlflow:{S}/x?y#z@db:5432/mlflow", [S, "/x?y#z"], ["postgresql://mlflow:", "@db:5432/mlflow"]),
    (f"https://user:p@ss{S}@host.example.com/path?q=1", [S, "p@ss"], ["https://user:", "@host.example.com/path?q=1"]),
    (f"mysql://root:{S}:with:colons@127.0.0.1:3306/db", [S, "with:colons"], ["mysql://root:", "@127.0.0.1:3306/db"]),
    (f"mongodb+srv://admin:p%40{S}@cluster0.abcde.mongodb.net/db?retryWrites=true", [S],
     ["mongodb+srv://admin:", "cluster0.abcde.mongodb.net/db?retryWrites=true"]),
    (f"amqp://guest:{S}'\"x@rabbit:5672//", [S], ["amqp://guest:", "@rabbit:5672//"]),
    (f"redis://:{S}@localhost:6379/0", [S], ["redis://:", "@localhost:6379/0"]),
    (f"ftp://anonymous:{S}@ftp.example.org/pub", [S], ["ftp://anonymous:", "ftp.example.org/pub"]),
    (f"https://x-access-token:ghs_{S}xxxxxxxxxxxxxxxxxxxxxxxxx@github.com/o/r.git", [S], ["https://x-access-token:", "@github.com/o/r.git"]),
    (f"https://{S}xxxxxxxxxxxxxxxxxxxx@github.com/o/r.git", [S], ["https://", "@github.com/o/r.git"]),
    (f"two: http://a:{S}1@h1:1/x http://b:{S}2@h2:2/y", [S], ["http://a:", "@h1:1/x", "http://b:", "@h2:2/y"]),
    (f"sqlalchemy.exc.OperationalError: (psycopg2) connection to 'postgresql://u:{S}@db/x' failed", [S], ["postgresql://u:", "@db/x' failed"]),
    # --- user:pass@host without a scheme
    (f"alice:{S}@db.example.com:5432/mlflow", [S], ["alice:", "@db.example.com:5432/mlflow"]),
    (f"connect to bob:p@{S}/x@10.0.0.7 failed", [S], ["connect to bob:", "@10.0.0.7 failed"]),
    # --- query-string credentials and signed URLs
    (f"https://host/api?user=bob&password={S}&x=1", [S], ["https://host/api?user=bob&password=", "&x=1"]),
    (f"https://hooks.example.com/hook?token={S}", [S], ["https://hooks.example.com/hook?token="]),
    (f"hooks.example.com/hook?token={S}", [S], ["hooks.example.com/hook?token="]),
    (f"https://example.com/cb#access_token={S}&token_type=bearer", [S], ["access_token=", "token_type=bearer"]),
    (f"https://api.example.com/v1/items?api_key={S}&page=2", [S], ["api_key=", "page=2"]),
    (f"https://maps.googleapis.com/maps/api/geocode/json?key={S}&address=x", [S], ["?key=", "address=x"]),
    (f"https://b.s3.amazonaws.com/k.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID{S}%2F20240101%2Fus-east-1%2Fs3"
     f"&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=IQo{S}&X-Amz-Signature=9f{S}",
     [S], ["X-Amz-Algorithm=AWS4-HMAC-SHA256", "X-Amz-Credential=", "X-Amz-Signature=", "X-Amz-Expires=3600", "b.s3.amazonaws.com/k.tar"]),
    (f"https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE&Expires=1700000000&Signature={S}%3D", [S, "AKIAIOSFODNN7EXAMPLE"],
     ["Expires=1700000000", "Signature="]),
    (f"https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p.iam{S}&X-Goog-Signature=ab{S}",
     [S], ["X-Goog-Algorithm=GOOG4-RSA-SHA256", "X-Goog-Signature="]),
    (f"https://acct.blob.core.windows.net/c/b.bin?sv=2022-11-02&ss=b&srt=o&sp=r&se=2024-01-01&sig={S}%3D", [S], ["sv=2022-11-02", "sig=", "se=2024-01-01"]),
    (f"jdbc:postgresql://db:5432/x?user=u&password={S}&ssl=true", [S], ["jdbc:postgresql://db:5432/x?user=u", "ssl=true"]),
    # --- ODBC / ADO / JDBC / libpq connection strings
    (f"Driver={{ODBC Driver 18 for SQL Server}};Server=tcp:db,1433;UID=sa;PWD={S};Database=x", [S], ["Server=tcp:db,1433;UID=sa;PWD=", ";Database=x"]),
    (f"Driver={{ODBC}};Server=db;Uid=sa;Pwd={{{S};with}}}}brace}};Database=x", [S, "with", "brace"], ["Uid=sa;Pwd=", ";Database=x"]),
    (f"Server=myServer;Database=x;User Id=u;Password={S}&more;Encrypt=yes", [S, "more"], ["User Id=u;Password=", ";Encrypt=yes"]),
    (f"Data Source=srv;Initial Catalog=x;User ID=u;Password=\"{S} with space\";", [S, "with space"], ["Data Source=srv", "Password=\""]),
    (f"jdbc:sqlserver://db:1433;databaseName=x;user=sa;password={S};encrypt=true", [S], ["databaseName=x;user=sa;password=", ";encrypt=true"]),
    (f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={S}==;EndpointSuffix=core.windows.net", [S],
     ["AccountName=acct;AccountKey=", ";EndpointSuffix=core.windows.net"]),
    (f"host=db port=5432 user=x password={S} dbname=y", [S], ["host=db port=5432 user=x password=", " dbname=y"]),
    (f"host=db password='{S} sp' dbname=y", [S, " sp'"], ["host=db password='", " dbname=y"]),
    # --- environment lines, JSON, YAML, reprs, headers
    (f"export AWS_SECRET_ACCESS_KEY={S}", [S], ["export AWS_SECRET_ACCESS_KEY="]),
    (f"MLFLOW_TRACKING_PASSWORD={S} MLFLOW_TRACKING_USERNAME=bob", [S], ["MLFLOW_TRACKING_PASSWORD=", "MLFLOW_TRACKING_USERNAME=bob"]),
    (json.dumps({"user": "bob", "password": S, "db_password": S + "2"}), [S], ['"user": "bob"', '"password": "', '"db_password": "']),
    (repr({"client_secret": S, "host": "h"}), [S], ["'client_secret': '", "'host': 'h'"]),
    (f"mlflow:\n  password: {S}\n  user: bob\n", [S], ["password: ", "user: bob"]),
    (f"Authorization: Bearer {S}0abcdef", [S], ["Authorization: Bearer "]),
    (f"Authorization: Basic YWxpY2U6{S}Mg==", [S], ["Authorization: Basic "]),
    (f"requests.exceptions.HTTPError: 401 with header Bearer {S}12345", [S], ["401 with header Bearer "]),
    # --- tokens with a recognisable shape, anywhere
    ("pushed with ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8" + " ok", ["a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"], ["pushed with ", " ok"]),
    ("token glpat-" + "xYz0123456789abcdefGH" + " expired", ["xYz0123456789abcdefGH"], ["token ", " expired"]),
    ("slack xoxb-" + "123456789012-1234567890123-AbCdEfGhIjKl" + " bot", ["AbCdEfGhIjKl"], ["slack ", " bot"]),
    ("https://hooks.slack.com/services/T00000000/B00000000/" + S + "XXXXXXXXXXXX", [S, "T00000000/B00000000"], ["https://hooks.slack.com/services/"]),
    ("hooks.slack.com/services/T00000000/B00000000/" + S + "XXXXXXXXXXXX", [S], ["hooks.slack.com/services/"]),
    ("https://discord.com/api/webhooks/123456789/" + S + "-abc_DEF", [S], ["https://discord.com/api/webhooks/123456789/"]),
    ("OPENAI key sk-proj-" + S + "abcdefghijklmnop", [S], ["OPENAI key "]),
    ("stripe sk_live_" + S + "abcdefghijklmnop", [S], ["stripe "]),
    ("google AIza" + "SyA1234567890abcdefghijklmnopqrstuv" + " maps", ["SyA1234567890abcdefghijklmnopqrstuv"], ["google ", " maps"]),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0." + S + "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", [S, "eyJzdWIiOiIxMjM0NTY3ODkwIn0"], ["jwt "]),
    ("key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow" + S + "\nAAAA\n-----END RSA PRIVATE KEY-----\nend", [S, "MIIEow"], ["key:", "PRIVATE KEY-----", "end"]),
]

# what the project writes every day: not one character of it may change
HARMLESS = [
    "MLflow tracking server http://127.0.0.1:5000 is unreachable ([Errno 111] Connection refused); start it or fix mlflow.tracking_uri",
    "sqlite:////tmp/ws/storage/mlflow.db", "file:///tmp/mlartifacts", "models:/dfkd-student@champion", "models:/dfkd-student/3",
    "git@github.com:owner/repo.git", "https://registry.npmjs.org/@scope/pkg", "https://example.com/a@b",
    "a photo of a {}.", "a {style} style of a {}", "max_tokens: 5, tokenizer=open_clip, partition_key=dog, key: value",
    "PromptTooLong: class 'x' (in `classes`) does not fit the teacher's text encoder: its prompt is 80 tokens, more than 77",
    "shard with fingerprint 0123456789abcdef already exists, reusing it", "code_sha256=abc spec_sha256=def weights_sha256=0a1b",
    "champion of dfkd: v2 -> v3 (rollback); evaluated_mean_top1=0.91", "Bearer token missing", "the sig= of nothing", "user=bob host=db",
    "postgresql+psycopg2://mlflow:***@db/mlflow",
]


@pytest.mark.parametrize("text, secrets, kept", CORPUS, ids=[f"{i:02d}-{row[0][:28]}" for i, row in enumerate(CORPUS)])
def test_redact_masks_every_secret_shape_and_keeps_the_rest(text, secrets, kept):
    out = redact(text)
    for s in secrets:
        assert s not in out, f"{s!r} survives in {out!r}"
    for k in kept:
        assert k in out, f"{k!r} (not secret) was lost: {out!r}"
    assert MASK in out
    assert redact(out) == out  # idempotent: masking twice changes nothing


@pytest.mark.parametrize("text", HARMLESS)
def test_redact_leaves_text_without_secrets_alone(text):
    assert redact(text) == text


def test_any_character_in_a_password_is_masked_fuzz():
    """Random passwords of every printable, non-space character (the URL userinfo allows none of them
    unescaped, but users write them) in the URL shapes the project records."""
    rng = random.Random(37)
    alphabet = string.ascii_letters + string.digits + string.punctuation
    shapes = ["postgresql+psycopg2://mlflow:{pw}@db.example.com:5432/mlflow", "https://bob:{pw}@mlflow.example.com/",
              "amqp://guest:{pw}@127.0.0.1:5672//", "bob:{pw}@db.internal:5432/x", "error: 'redis://:{pw}@cache:6379/0' refused",
              "https://h/x?token={tok}&a=1", "Server=db;UID=sa;PWD={{{brace}}};Database=x", "password={tok} host=db"]
    for i in range(600):
        pw = "Zq" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) + "Xk"
        if pw.startswith("/"):  # `name:/x@y` is a URI (models:/name@alias), not a credential
            pw = "Z" + pw
        tok = "".join(rng.choice(string.ascii_letters + string.digits + "-_.~%") for _ in range(rng.randint(4, 40))) + "Q9"
        brace = pw.replace("}", "}}")
        shape = shapes[i % len(shapes)]
        text = shape.format(pw=pw, tok=tok, brace=brace)
        out = redact(text)
        secret = tok if "{tok}" in shape else pw
        assert secret not in out, f"{text!r} -> {out!r}"
        for host in ("db.example.com:5432/mlflow", "mlflow.example.com/", "127.0.0.1:5672//", "db.internal:5432/x", "cache:6379/0",
                     "https://h/x?token=", "Database=x", "host=db"):
            if host in shape:
                assert host in out, f"{host!r} lost: {text!r} -> {out!r}"


def test_redact_takes_linear_time_on_long_unspaced_text():
    """Compact JSON and long tokens (no spaces) in an error text: a bounded password length keeps it linear."""
    import time

    for text in ('{"a":"b",' * 30000, "a:b," * 30000, "http://a:b," * 10000, "password=a," * 20000):
        start = time.perf_counter()
        redact(text)
        assert time.perf_counter() - start < 5, text[:20]


@pytest.mark.parametrize("url, bare, user, password", [
    ("https://bob:pa/ss@mlflow.example.com/x", "https://mlflow.example.com/x", "bob", "pa/ss"),
    ("http://bob:p@ss?#x@127.0.0.1:5000", "http://127.0.0.1:5000", "bob", "p@ss?#x"),
    ("http://bob:p%2Fq%40@127.0.0.1:5000", "http://127.0.0.1:5000", "bob", "p/q@"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000", None, None),
    ("postgresql://u:p@db/x", "postgresql://u:p@db/x", None, None),  # a database URI keeps its password (MLflow needs it there)
])
def test_split_credentials_takes_the_whole_password(url, bare, user, password):
    assert split_credentials(url) == (bare, user, password)


# ------------------------------------------------------------------------- the places that record text


def _settings(tmp_path, changes: dict) -> Path:
    d = yaml.safe_load((ROOT / "configs" / "ci.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    d["workspace"] = str(tmp_path / "ws")
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_settings_record_store_urls_masked_mlflow_params_config_yaml_and_config_hash(tmp_path):
    """`public_dump` is what MLflow params, config.yaml, data/params.yaml and the config hash are made of."""
    from dfkd_assets.config import load_config
    from dfkd_assets.defs.resources import _flatten

    cfg = load_config(_settings(tmp_path, {"mlflow.tracking_uri": f"postgresql+psycopg2://mlflow:a/{S}?b@db:5432/mlflow",
                                           "dvc.remote_url": f"https://dvc.example.com/store?X-Amz-Signature={S}2&X-Amz-Credential=AKID{S}3"}))
    blob = json.dumps(_flatten(cfg.public_dump())) + yaml.safe_dump(cfg.public_dump())
    assert S not in blob
    assert "postgresql+psycopg2://mlflow:***@db:5432/mlflow" in blob and "https://dvc.example.com/store?X-Amz-Signature=***" in blob
    rotated = load_config(_settings(tmp_path, {"mlflow.tracking_uri": "postgresql+psycopg2://mlflow:other@db:5432/mlflow",
                                               "dvc.remote_url": "https://dvc.example.com/store?X-Amz-Signature=x&X-Amz-Credential=y"}))
    assert rotated.config_hash() == cfg.config_hash()  # rotating a secret is not a new configuration


def test_model_card_never_holds_the_store_password(tmp_path):
    """The card (a model version's description) quotes the store in its reproduce command."""
    from types import SimpleNamespace

    from dfkd_assets.config import load_config
    from dfkd_assets.defs.registry import ModelRegistry

    uri = f"postgresql+psycopg2://mlflow:pa/{S}#x@db.example.com:5432/mlflow"
    cfg = load_config(_settings(tmp_path, {"mlflow.tracking_uri": uri}))
    written = {}

    class Client:
        def get_model_version(self, name, version):
            return SimpleNamespace(run_id="r1", tags={"teacher_id": "t", "git_sha": "abc"})

        def update_model_version(self, name, version, description):
            written["card"] = description

    class Tracking:
        def client(self, cfg):
            return Client()

        def uri(self, cfg):
            return cfg.mlflow.tracking_uri

    text = ModelRegistry(cfg, Tracking()).write_card("1")
    assert written["card"] == text and S not in text
    assert "MLFLOW_TRACKING_URI='postgresql+psycopg2://mlflow:***@db.example.com:5432/mlflow'" in text


def test_step_errors_are_recorded_masked_with_their_causes_and_retry_rules_kept():
    """defs/errors.no_retry_for_bad_input: Dagster records a Failure's description and every chained
    cause, so both are masked; an error of another kind holding a secret stays retryable."""
    import dagster as dg

    from dfkd_assets.config import ConfigError
    from dfkd_assets.defs.errors import no_retry_for_bad_input

    def chain(e: BaseException) -> str:
        out = []
        while e is not None:
            out.append(f"{type(e).__name__}: {e}")
            e = e.__cause__ or e.__context__
        return "\n".join(out)

    @no_retry_for_bad_input
    def bad_setting():
        try:
            raise OSError(f"could not reach redis://:{S}@cache:6379/0")
        except OSError as inner:
            raise ConfigError(f"dvc.remote_url https://h/x?token={S} refused") from inner

    with pytest.raises(dg.Failure) as e:
        bad_setting()
    assert not e.value.allow_retries and S not in e.value.description and S not in chain(e.value)
    assert "https://h/x?token=***" in e.value.description and "redis://:***@cache:6379/0" in chain(e.value)

    @no_retry_for_bad_input
    def transient():
        raise RuntimeError(f"connection to postgresql://u:{S}@db:5432/x reset")

    with pytest.raises(dg.Failure) as e:
        transient()
    assert e.value.allow_retries and S not in chain(e.value) and "postgresql://u:***@db:5432/x" in e.value.description

    @no_retry_for_bad_input
    def plain():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # nothing to mask: the error itself, as before
        plain()


def test_redact_exception_keeps_tracebacks_and_masks_every_link():
    from dfkd_assets.redaction import redact_exception

    try:
        try:
            raise ValueError(f"pw={S}")
        except ValueError as a:
            raise KeyError(f"https://u:{S}@h/") from a
    except KeyError as e:
        b, clean = e, redact_exception(e)
    assert clean.__traceback__ is b.__traceback__ and clean.__cause__.__traceback__ is b.__cause__.__traceback__
    assert "KeyError" in str(clean) and "ValueError" in str(clean.__cause__)
    assert S not in str(clean) + str(clean.__cause__)


@pytest.mark.parametrize("url", [
    f"hooks.example.com/services/T0/B0/{S}",  # the case: no scheme, urllib quotes the URL in its error
    f"hooks.example.com/hook?token={S}", f"ftp://hooks.example.com/{S}", f"https:///{S}", f"http://[::1/{S}", f"javascript:{S}",
])
def test_a_webhook_url_that_is_not_http_is_refused_without_its_token(url):
    from dfkd_assets.defs.notify import WebhookError, post_webhook, webhook_request

    with pytest.raises(WebhookError) as e:
        webhook_request(url, {"a": 1}, "DFKD_FAILURE_WEBHOOK")
    assert "$DFKD_FAILURE_WEBHOOK" in str(e.value) and S not in str(e.value) and "hooks.example.com" not in str(e.value)
    warning = post_webhook(url, {"a": 1}, "DFKD_FAILURE_WEBHOOK")
    assert warning and S not in warning


def test_webhook_delivery_errors_and_the_failure_record_hold_no_secret():
    import socket

    from dfkd_assets.defs.notify import failure_record, post_webhook

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    warning = post_webhook(f"http://127.0.0.1:{port}/hook?token={S}", {"a": 1}, "DFKD_FAILURE_WEBHOOK", timeout=2)
    assert warning and "did not answer" in warning and S not in warning
    # a secret that a cut at 2000 characters would split is masked first
    record = failure_record("r", "j", "x" * 1990 + f" postgresql://u:{S}{S}{S}@db/x")
    assert S[:5] not in record["error"] and len(record["error"]) <= 2000


# ---------------------------------------------------------------- MLflow credentials, one server at a time


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in MLflow server: answers `experiments/search` with no experiments and records the Authorization header."""

    def _answer(self):
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"experiments": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def _server():
    handler = type("Handler", (_Recorder,), {"seen": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, handler.seen


def test_mlflow_credentials_of_one_server_never_reach_another(tmp_path, monkeypatch):
    """Server A is given with user:password@; a later client of server B (no credentials) in the same
    process must not send A's credentials; after the step (the resource's teardown) none are left."""
    import base64

    from dfkd_assets.config import load_config
    from dfkd_assets.defs.resources import MlflowTracking

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (a, seen_a), (b, seen_b) = _server(), _server()
    try:
        cfg = load_config(_settings(tmp_path, {"mlflow.tracking_uri": f"http://alice:p/{S}@127.0.0.1:{a.server_port}"}))
        tracking = MlflowTracking()
        tracking.client(cfg).search_experiments()
        assert seen_a and seen_a[-1][1] == "Basic " + base64.b64encode(f"alice:p/{S}".encode()).decode()  # A gets its credentials
        MlflowTracking(tracking_uri=f"http://127.0.0.1:{b.server_port}").client(cfg).search_experiments()
        assert seen_b and all(auth is None for _, auth in seen_b), seen_b  # B never sees them
        assert S not in os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
        tracking.client(cfg)  # A again ...
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == f"p/{S}"
        tracking.teardown_after_execution(None)  # ... and the step ends
        assert "MLFLOW_TRACKING_PASSWORD" not in os.environ and "MLFLOW_TRACKING_USERNAME" not in os.environ
    finally:
        a.shutdown()
        b.shutdown()


def test_credentials_the_user_exported_are_left_alone(monkeypatch):
    from dfkd_assets.redaction import release_tracking_credentials, tracking_credentials, use_tracking_credentials

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ops")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "exported")
    assert use_tracking_credentials("http://127.0.0.1:1") == "http://127.0.0.1:1"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "exported"  # not ours to remove
    with tracking_credentials(f"http://bob:{S}@127.0.0.1:2") as bare:
        assert bare == "http://127.0.0.1:2" and os.environ["MLFLOW_TRACKING_PASSWORD"] == S
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "exported"  # ours are gone after the block, theirs are back
    use_tracking_credentials(f"http://bob:{S}@127.0.0.1:2")
    use_tracking_credentials("http://127.0.0.1:3")  # another server: ours go, theirs come back
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ops" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "exported"
    release_tracking_credentials()
