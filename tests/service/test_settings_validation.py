"""Every setting is checked when the service starts, and a bad value stops it with a message naming it.

``BAD`` holds, for every field of ``Settings``, values an operator could plausibly type that the
service cannot run with (infinite or zero times, a heartbeat too short to ever be read, keys that
name no key, files that are not key lists, URLs of the wrong kind); a new field without a row fails
``test_every_setting_has_bad_values``.
"""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.text import MAX_CAPTION_CHARS
from service.errors import ConfigError
from service.settings import MAX_KEYS_BYTES, Settings, env_name, load_settings

BAD: dict[str, list[str]] = {
    "redis_url": ["http://redis:6379", "redis://", "redis://host name", "x" * 3000],
    "redis_timeout_s": ["0", "-1", "inf", "nan", "1e9"],
    "key_prefix": ["", "a b", "x" * 65, "pre/fix"],
    "model": ["", "ViT B 16", "x" * 300],
    "pretrained": ["x" * 5000],
    "device": ["gpu", "cuda:x", "cuda 0"],
    "cache_dir": ["x" * 5000],
    "tokenizer": ["x" * 5000],
    "host": ["", "local host", "x" * 300],
    "port": ["-1", "65536", "http"],
    "max_batch": ["0", "100000", "2.5"],
    "max_wait_ms": ["-1", "600001"],
    "visibility_timeout_s": ["0", "inf", "nan", "1e12"],
    "max_deliveries": ["0", "1000"],
    "job_timeout_s": ["0", "-5", "inf"],
    "heartbeat_s": ["1e-9", "0", "-1", "inf", "100000"],
    "memory_fraction": ["0", "1.5", "nan", "-0.5"],
    "worker_name": ["", "two words", "x" * 300],
    "wait_max_s": ["inf", "-1", "nan", "1e9"],
    "result_ttl_s": ["0", "99999999999"],
    "max_stored_bytes": ["0", "9" * 20],
    "max_queue": ["0", "-1", "99999999999"],
    "max_upload_bytes": ["0", "99999999999"],
    "max_pixels": ["0", "99999999999"],
    "max_captions": ["0", "1000000"],
    "max_selections": ["-1", "1000000"],
    "max_steps": ["0", "10000000"],
    "max_caption_chars": ["0", str(MAX_CAPTION_CHARS + 1)],
    "max_renders": ["0", "100000"],
    "client_timeout_s": ["0", "inf", "nan"],
    "body_timeout_s": ["0", "inf", "-1"],
    "api_keys": [" , ", ",", "  ", " ,\t, "],
    "api_keys_file": ["/dev/zero", "/nonexistent/keys.txt", "/", "/dev/null"],
    "owner_secret": ["x" * 5000],
    "cors_origins": ["example.com", "http://a.example/path", "ftp://a.example", "http://[::1"],
    "label_studio_url": ["ftp://x", "http://[::1", "example.com:8080", "http://"],
    "label_studio_api_key": ["x" * 5000],
    "label_studio_mask_level": ["0", "1.5", "nan"],
    "label_studio_min_token_score": ["-0.1", "2", "inf"],
    "label_studio_budget_s": ["0", "inf", "1e9"],
    "label_studio_max_answer_bytes": ["0", "99999999999"],
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting from the test process's own environment."""
    for name in list(os.environ):
        if name.startswith("EXCLIP_") or name in ("REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
            monkeypatch.delenv(name)
    return monkeypatch


def _refused(clean_env: pytest.MonkeyPatch, field: str, value: str) -> str:
    """The message a service started with ``value`` in the setting's env var stops with."""
    name = env_name(field)
    clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        load_settings().keys  # noqa: B018 - what `serve` reads before it loads a model or binds
    clean_env.delenv(name)
    return str(refused.value)


def test_every_setting_has_bad_values():
    assert set(BAD) == set(Settings.model_fields), "give each setting a bound and bad values here"


def test_the_defaults_load(clean_env):
    assert load_settings().keys == ()


@pytest.mark.parametrize(
    "name", ["REDIS_URL", "EXCLIP_API_KEYS", "EXCLIP_API_KEYS_FILE", "EXCLIP_DEVICE", "LABEL_STUDIO_URL"]
)
def test_an_empty_optional_setting_is_unset(clean_env, name):
    clean_env.setenv(name, "")
    settings = load_settings()
    assert settings.keys == ()
    field = next(f for f in Settings.model_fields if env_name(f) == name)
    assert getattr(settings, field) is None


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, values in BAD.items() for v in values])
def test_a_bad_value_stops_the_service_naming_the_setting(clean_env, field, value):
    message = _refused(clean_env, field, value)
    assert env_name(field) in message, message
    if field in ("api_keys", "owner_secret", "label_studio_api_key"):
        assert f"{env_name(field)}=<hidden>" in message, "a secret's value is echoed"


@settings(max_examples=60, deadline=None)
@given(
    field=st.sampled_from(
        [f for f, info in Settings.model_fields.items() if info.annotation in (int, float, "int", "float")]
    ),
    value=st.one_of(
        st.sampled_from(["inf", "-inf", "nan", "NaN", "1e400", "-1e400"]),
        st.integers(max_value=-1).map(str),
        st.integers(min_value=10**16).map(str),
    ),
)
def test_no_number_setting_takes_infinite_nan_negative_or_huge_values(field, value):
    # The environment is not touched here (hypothesis re-runs the body): the same values as overrides.
    with pytest.raises(ConfigError, match=env_name(field)):
        load_settings(**{field: value})


def test_keys_that_name_no_key_fail_closed_like_an_empty_keys_file(clean_env, tmp_path):
    """``EXCLIP_API_KEYS=" , "`` started an open service; now it stops, as an empty keys file does."""
    assert "EXCLIP_API_KEYS=<hidden>" in _refused(clean_env, "api_keys", " , ")
    empty = tmp_path / "keys.txt"
    empty.write_text("\n# none\n")
    assert "holds no key" in _refused(clean_env, "api_keys_file", str(empty))
    clean_env.setenv("EXCLIP_API_KEYS", "")  # empty: unset, as for every other setting
    assert load_settings().keys == ()
    clean_env.setenv("EXCLIP_API_KEYS", " a-key , ,b-key ")
    assert load_settings().keys == ("a-key", "b-key")


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/urandom"])
def test_a_keys_file_that_is_a_device_is_refused_without_reading_it(special):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="is not a regular file"):
        Settings(api_keys_file=special).keys  # noqa: B018
    assert time.monotonic() - t0 < 5


def test_a_keys_file_over_the_cap_is_refused(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_bytes(b"k" * 40 + b"\n" + b"#" * MAX_KEYS_BYTES)
    with pytest.raises(ConfigError, match=f"larger than {MAX_KEYS_BYTES} bytes"):
        Settings(api_keys_file=path).keys  # noqa: B018
    link = tmp_path / "link.txt"  # a mounted secret is a symlink to a regular file: followed
    (tmp_path / "real.txt").write_text("the-key\n")
    link.symlink_to(tmp_path / "real.txt")
    assert Settings(api_keys_file=link).keys == ("the-key",)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"EXCLIP_WAIT_MAX_S": "inf"}, "EXCLIP_WAIT_MAX_S"),
        ({"EXCLIP_HEARTBEAT_S": "1e-9"}, "EXCLIP_HEARTBEAT_S"),
        ({"EXCLIP_API_KEYS": " , "}, "EXCLIP_API_KEYS"),
        ({"EXCLIP_API_KEYS_FILE": "/dev/zero"}, "EXCLIP_API_KEYS_FILE"),
    ],
)
def test_serve_with_a_bad_setting_exits_with_one_line_naming_it(launcher, env, name):
    proc = launcher.embedded(**env)
    assert proc.proc.wait(60) == 2, proc.output
    assert f"exclip-service: invalid settings: {name}=" in proc.output or f"{name}=" in proc.output
    assert "Traceback" not in proc.output and "Uvicorn running" not in proc.output
