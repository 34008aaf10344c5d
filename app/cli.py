"""The `edison` command: serve, doctor, make-demo, config-reference."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.errors import ConfigError

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _load(config: str | None, check_paths: bool = True):
    from services.settings import load_settings

    try:
        return load_settings(config, check_paths=check_paths)
    except ConfigError as exc:
        print(f"edison: invalid configuration: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None


def _server_class(app: Any) -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn that shuts down on SIGINT/SIGTERM and then returns, so `edison serve`
        exits 0 after a clean shutdown (uvicorn re-raises the signal, exiting -15), and
        that ends the open event streams first: uvicorn waits for every open response
        before it stops, and an /events client never ends its own."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            bus = getattr(app.state, "events", None)
            if bus is not None:
                bus.from_thread(bus.close)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit) for s in SHUTDOWN_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.logging_setup import configure_logging
    from app.main import create_app

    settings = _load(args.config)
    if settings.cluster is not None:
        from services.cluster.preflight import check_database

        try:
            check_database(settings.cluster)
        except ConfigError as exc:
            print(f"edison: {exc.message}", file=sys.stderr)
            return 2
    if args.host:
        settings.server.host = args.host
    if args.port:
        settings.server.port = args.port
    configure_logging(settings.server.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        timeout_graceful_shutdown=30,
    )
    server = _server_class(app)(config)
    server.run()
    return 0 if server.started else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from services.doctor import diagnose

    settings = _load(args.config, check_paths=False) if args.config else None
    report = diagnose(settings)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2, default=str))
    else:
        from services.doctor import format_report

        print(format_report(report))
    return 0


def cmd_make_demo(args: argparse.Namespace) -> int:
    from services.demo.assets import make_demo_assets

    made = make_demo_assets(Path(args.out), force=args.force)
    for p in made:
        print(f"made {p}")
    if not made:
        print(f"demo assets already present in {args.out}")
    return 0


def cmd_config_reference(_: argparse.Namespace) -> int:
    from services.config_reference import config_reference

    print(config_reference())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edison", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the HTTP server")
    p.add_argument("--config", help="config file (default: $EDISON_CONFIG or config/edison.yaml)")
    p.add_argument("--host", help="override server.host")
    p.add_argument("--port", type=int, help="override server.port")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("doctor", help="print the memory snapshot and what each probe step said")
    p.add_argument("--config", help="config file whose memory settings to use")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("make-demo", help="generate the tiny demo models and pipelines")
    p.add_argument("--out", default="var/demo", help="folder to write them to")
    p.add_argument("--force", action="store_true", help="write them again even if present")
    p.set_defaults(func=cmd_make_demo)
    p = sub.add_parser("config-reference", help="print the config reference as Markdown")
    p.set_defaults(func=cmd_config_reference)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
