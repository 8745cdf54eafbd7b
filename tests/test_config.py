"""The option registry: each setting declared once, typed section objects built from it."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

import pytest

from memguard import config
from memguard.config import UploadOptions

SECTIONS = [config.BodyOptions, config.MemoryOptions, config.GunicornOptions, UploadOptions]


def test_every_section_has_its_typed_object() -> None:
    assert {cls.SECTION for cls in SECTIONS} == {s.section for s in config.SETTINGS.values()}


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda cls: cls.__name__)
def test_a_typed_section_is_its_options_without_the_prefix(
        cls: type[config.SectionOptions]) -> None:
    declared = {name.removeprefix(cls.PREFIX) for name, s in config.SETTINGS.items()
                if s.section == cls.SECTION}
    assert {f.name for f in dataclasses.fields(cls)} == declared
    defaults = cls.resolve({}, environ={})
    for name, s in config.SETTINGS.items():
        if s.section == cls.SECTION:
            assert getattr(defaults, name.removeprefix(cls.PREFIX)) == config.default(name)


def test_upload_options_take_keywords_then_the_environment() -> None:
    opts = UploadOptions.resolve({"max_files": 3},
                                 environ={"MEMGUARD_UPLOAD_MAX_FILES": "7",
                                          "MEMGUARD_UPLOAD_MAX_PARTS": "9"})
    assert opts.max_files == 3 and opts.max_parts == 9
    with pytest.raises(TypeError, match="upload_max_file"):
        UploadOptions.resolve({"max_file": 1}, environ={})


# ---- issue 16, defect 7: bad configuration fails closed --------------------------------

TEXT_OPTIONS = {"heavy_methods", "heavy_paths", "leak_admin_token"}  # free text


@pytest.mark.parametrize("name", sorted(n for n, s in config.SETTINGS.items() if s.env))
@pytest.mark.parametrize("value", ["", "  ", "nan", "inf", "-inf", "1e999"])
def test_empty_nan_and_inf_are_refused_naming_the_option_and_variable(
        name: str, value: str) -> None:
    setting = config.SETTINGS[name]
    assert setting.env is not None
    if name in TEXT_OPTIONS and (value.strip() or setting.empty_ok):
        pytest.skip("free text: any text is a value")
    with pytest.raises(ValueError) as info:
        config.resolve([setting.section], {}, environ={setting.env: value})
    assert repr(name) in str(info.value) and setting.env in str(info.value)


@pytest.mark.parametrize(("name", "value"), [
    ("body_idle_timeout", float("nan")), ("body_rate_grace", float("inf")),
    ("max_body_size", ""), ("gunicorn_watchdog_interval", 1e300),
    ("gunicorn_watchdog_interval", 0.001), ("gunicorn_hard_limit_grace", float("nan")),
    ("memory_psi_threshold", 101), ("upload_max_files", -1),
    ("gunicorn_max_concurrent_recycles", 0),
])
def test_bad_keywords_are_refused_too(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=repr(name)):
        config.resolve([config.SETTINGS[name].section], {name: value}, environ={})


def test_off_still_turns_an_option_off_and_zero_still_means_off_where_documented() -> None:
    values = config.resolve(["body", "gunicorn"], {}, environ={
        "MEMGUARD_MAX_BODY_SIZE": "off", "MEMGUARD_BODY_IDLE_TIMEOUT": "0",
        "MEMGUARD_WATCHDOG_INTERVAL": "0", "MEMGUARD_TOTAL_MEMORY_LIMIT": "off"})
    assert values["max_body_size"] is None and values["body_idle_timeout"] == 0
    assert values["gunicorn_watchdog_interval"] == 0
    assert values["gunicorn_total_memory_limit"] is None


def test_the_middleware_refuses_an_empty_body_limit_at_startup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from memguard import MemGuardMiddleware, MemGuardWSGIMiddleware

    monkeypatch.setenv("MEMGUARD_MAX_BODY_SIZE", "")
    for middleware in (MemGuardMiddleware, MemGuardWSGIMiddleware):
        with pytest.raises(ValueError, match="MEMGUARD_MAX_BODY_SIZE"):
            middleware(lambda *args: None)


@pytest.mark.server
def test_gunicorn_refuses_a_nan_grace_at_startup() -> None:
    from tests.support.servers import serve

    with pytest.raises(RuntimeError) as info, serve(
            "gunicorn", "tests.apps.hello:wsgi_app",
            ["-c", "python:memguard.gunicorn.conf", "-w", "1"],
            env={"MEMGUARD_HARD_LIMIT_GRACE": "nan"}, timeout=20):
        pass
    assert "MEMGUARD_HARD_LIMIT_GRACE" in str(info.value) and "finite" in str(info.value)


# ---- defect 8: a memory limit of 0 has one meaning: refused ---------------------------


@pytest.mark.parametrize("variable", ["MEMGUARD_WORKER_MEMORY_LIMIT",
                                      "MEMGUARD_WORKER_MEMORY_HARD_LIMIT",
                                      "MEMGUARD_TOTAL_MEMORY_LIMIT"])
@pytest.mark.parametrize("value", ["0", "0MiB", "0%"])
def test_a_zero_memory_limit_is_refused_on_both_sides(variable: str, value: str) -> None:
    from memguard.gunicorn.limits import resolve_limits

    message = f"{variable}.*write \"off\" for no limit"
    with pytest.raises(ValueError, match=message):
        resolve_limits({}, environ={variable: value})  # the master
    if variable != "MEMGUARD_TOTAL_MEMORY_LIMIT":
        with pytest.raises(ValueError, match=message):
            config.resolve(["body", "memory"], {}, environ={variable: value})  # middleware


def test_the_gunicorn_start_line_says_none_only_for_no_limit() -> None:
    from memguard.gunicorn.limits import resolve_limits

    limits = resolve_limits({}, environ={"MEMGUARD_WORKER_MEMORY_LIMIT": "off",
                                         "MEMGUARD_WORKER_MEMORY_HARD_LIMIT": "1",
                                         "MEMGUARD_TOTAL_MEMORY_LIMIT": "off"})
    assert limits.describe().startswith("worker soft limit none, hard limit 1 B, "
                                        "pool budget none")


# ---- defect 10: no endpoint may shadow the app ----------------------------------------


@pytest.mark.parametrize("options", [
    {"leak_admin_path": "/", "leak_admin_token": "t"},
    {"leak_admin_path": "//", "leak_admin_token": "t"},
    {"readiness_path": "/"},
    {"metrics_path": "/"},
    {"liveness_path": "/"},
    {"readiness_path": "/health", "liveness_path": "/health"},
    {"leak_admin_path": "/admin", "leak_admin_token": "t", "metrics_path": "/admin/metrics"},
    {"leak_admin_path": "/admin"},  # no token
    {"metrics_path": "/me trics"},
])
def test_endpoint_paths_that_would_shadow_the_app_are_refused(options: dict[str, Any]) -> None:
    from memguard import MemGuardMiddleware

    with pytest.raises(ValueError, match="memguard option"):
        MemGuardMiddleware(lambda *args: None, **options)


# ---- cross-field rules live with the registry -----------------------------------------


@pytest.mark.parametrize("sections", [["memory"], ["gunicorn", "memory"]])
@pytest.mark.parametrize(("soft_value", "hard_value"), [("200MiB", "100MiB"),
                                                        ("50%", "25%")])
def test_a_hard_limit_below_the_soft_one_is_refused(sections: list[str], soft_value: str,
                                                    hard_value: str) -> None:
    with pytest.raises(ValueError, match="must be"):
        config.resolve(sections, {}, environ={"MEMGUARD_WORKER_MEMORY_LIMIT": soft_value,
                                              "MEMGUARD_WORKER_MEMORY_HARD_LIMIT": hard_value})


def test_one_variable_feeds_one_setting() -> None:
    owners: dict[str, list[str]] = {}
    for name, s in config.SETTINGS.items():
        if s.env:
            owners.setdefault(s.env, []).append(name)
    assert {env: names for env, names in owners.items() if len(names) > 1} == {}


@pytest.mark.parametrize(("soft", "hard"), [("25%", "50%"), ("auto", "auto"),
                                            ("100MiB", "30%")])
def test_the_master_and_the_middleware_resolve_the_same_bytes(soft: str, hard: str) -> None:
    """Issue 16, defect 9: without a container limit, "25%" was host RAM to the master
    and no limit at all to the middleware reading the same variable."""
    from memguard.gunicorn.limits import resolve_limits
    from memguard.memory.admission import MemoryAdmission

    env = {"MEMGUARD_WORKER_MEMORY_LIMIT": soft, "MEMGUARD_WORKER_MEMORY_HARD_LIMIT": hard}
    master = resolve_limits({}, environ=env)
    if soft == "auto":  # the master derives none; the middleware then takes its (none)
        assert (master.soft, master.hard) == (None, None)
        return
    admission = MemoryAdmission.from_options(config.resolve(["memory"], {}, environ=env))
    assert (admission.soft_limit, admission.hard_limit) == (master.soft, master.hard)
    assert master.soft is not None and master.hard is not None


# ---- issue 15 item 5: a component built by hand defaults to the registry's values -----


@pytest.mark.parametrize(("component", "parameter", "option"), [
    ("memguard.memory.admission:MemoryAdmission", "refresh_interval", "memory_refresh_interval"),
    ("memguard.memory.admission:MemoryAdmission", "container_threshold",
     "container_memory_threshold"),
    ("memguard.memory.admission:MemoryAdmission", "psi_threshold", "memory_psi_threshold"),
    ("memguard.memory.admission:MemoryAdmission", "shed", "memory_shed"),
    ("memguard.memory.admission:MemoryAdmission", "retry_after", "memory_retry_after"),
    ("memguard.memory.admission:MemoryAdmission", "body_check_every", "body_memory_check_every"),
    ("memguard.memory.tracking:RequestTracker", "sample_interval", "memory_sample_interval"),
    ("memguard.memory.tracking:RequestTracker", "max_routes", "max_routes"),
    ("memguard.memory.tracking:RequestTracker", "leak_window", "leak_window"),
    ("memguard.memory.tracking:RequestTracker", "leak_windows", "leak_windows"),
    ("memguard.memory.tracking:RequestTracker", "leak_min_growth", "leak_min_growth"),
    ("memguard.memory.tracking:RequestTracker", "leak_min_objects", "leak_min_objects"),
    ("memguard.memory.endpoints:HealthEndpoint", "details", "readiness_details"),
    ("memguard.memory.metrics:MetricsExporter", "cache", "metrics_cache"),
])
def test_constructor_defaults_are_the_registrys(component: str, parameter: str,
                                                option: str) -> None:
    module, _, name = component.partition(":")
    cls = getattr(importlib.import_module(module), name)
    declared = inspect.signature(cls).parameters[parameter].default
    assert declared == config.default(option)


def test_the_reference_says_what_each_option_refuses(repo: Any) -> None:
    for name, s in config.SETTINGS.items():
        assert s.refused or s.empty_ok, f"{name}: say what its parser refuses (refuses())"
    uploads_doc = (repo / "docs" / "uploads.md").read_text()
    for name, s in config.SETTINGS.items():
        if s.section == "uploads":
            assert f"`{name}`" in uploads_doc, f"docs/uploads.md's table lacks {name}"
