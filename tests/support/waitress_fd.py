"""``python -m tests.support.waitress_fd FD [--option=value ...] module:app``: Waitress
serving ``app`` on the listening socket inherited as descriptor ``FD`` (waitress-serve
itself takes no descriptor). Options are Waitress's own settings, as waitress-serve
spells them."""

from __future__ import annotations

import importlib
import socket
import sys

import waitress


def main(argv: list[str]) -> None:
    fd, *options, target = argv
    module, _, attr = target.partition(":")
    app = getattr(importlib.import_module(module), attr or "application")
    settings = dict(option.removeprefix("--").replace("-", "_").split("=", 1)
                    for option in options)
    sock = socket.socket(fileno=int(fd))
    waitress.serve(app, sockets=[sock], **settings)


if __name__ == "__main__":
    main(sys.argv[1:])
