"""Each optional extra is optional: memguard-web alone, or with one extra, installed in a
fresh venv from the wheel, imports and works for what it covers, and a feature whose
extra is missing fails with a message naming the extra to install. Slow (a venv and an
install each): `make test-extras`, run by CI."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import http_request, serve

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
EXTRAS = ["none", "gunicorn", "uvicorn", "prometheus", "multipart"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                    str(REPO)], check=True, timeout=600)
    (built,) = out.glob("memguard_web-*.whl")
    return built


def test_the_wheel_holds_the_package_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n == "memguard/__init__.py" for n in names)
    assert not [n for n in names if n.startswith("tests/")], names
    assert "memguard/testing.py" not in names


@pytest.fixture(scope="module", params=EXTRAS)
def venv(request: pytest.FixtureRequest, wheel: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    extra = request.param
    root = tmp_path_factory.mktemp(f"venv-{extra}")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    target = f"{wheel}[{extra}]" if extra != "none" else str(wheel)
    subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", target],
                   check=True, timeout=600)
    yield extra, root / "bin" / "python"


def test_what_the_install_covers_works_and_the_rest_names_its_extra(
        venv: tuple[str, Path], repo: Path) -> None:
    extra, python = venv
    done = subprocess.run([str(python), "-m", "tests.support.extras_check"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["middlewares"] == {"asgi_small": 200, "asgi_big": 413,
                                    "wsgi_small": 200, "wsgi_big": 413}
    if extra == "prometheus":
        assert found["metrics"] is None
    else:
        assert "memguard-web[prometheus]" in found["metrics"]
    if extra == "multipart":
        assert found["multipart"] is None
    else:
        assert "memguard-web[multipart]" in found["multipart"]
    # matplotlib ([plot]) is in none of these.
    assert found["plot"].startswith("2 ") and "memguard-web[plot]" in found["plot"]
    # The servers' extras serve, gunicorn with memguard's hooks.
    if extra == "gunicorn":
        kind, app, args = "gunicorn", "tests.apps.hello:wsgi_app", [
            "-c", "python:memguard.gunicorn.conf"]
    elif extra == "uvicorn":
        kind, app, args = "uvicorn", "tests.apps.hello:asgi_app", []
    else:
        return
    with serve(kind, app, args, cwd=repo, python=str(python)) as server:
        status, _, body = http_request(server.url)
        assert status == 200 and body.startswith(b"hello from ")
