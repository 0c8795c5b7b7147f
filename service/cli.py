"""``exclip-service``: ``serve`` (API; plus a worker when there is no REDIS_URL), ``worker``, ``explain``,
``models`` (which open_clip architectures are explained, and why the others are refused).

Flags override the ``EXCLIP_*`` env vars of service.settings. A model that cannot be had (offline
without a cached copy, missing checkpoint) stops the command with its message and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attribution.errors import AttributionError
from attribution.explainer import DEFAULT_TEXT_REFERENCE, TEXT_REFERENCES
from attribution.quadrature import RULES
from attribution.selections import Box, Selection, Span
from service.errors import ConfigError
from service.settings import Settings, load_settings

log = logging.getLogger("exclip")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return load_settings(**overrides)


def _load_models(settings: Settings) -> list[Any]:
    from attribution.models import load_model_or_demo

    log.info(
        "loading model %s (%s) on %s",
        settings.model,
        settings.pretrained or "random weights",
        settings.resolved_device,
    )
    return [
        load_model_or_demo(
            settings.model,
            settings.pretrained,
            requested=settings.model_requested,
            device=settings.resolved_device,
            cache_dir=settings.cache_dir,
            tokenizer=settings.tokenizer,
        )
    ]


def serve(settings: Settings) -> None:
    import uvicorn

    from service.app import create_app

    settings.keys  # noqa: B018 - read (and fail closed on) the keys file before loading a model
    models = None
    if not settings.redis_url:
        log.info("no REDIS_URL: embedded mode (in-memory queue, one worker in this process)")
        models = _load_models(settings)
    app = create_app(settings, worker_models=models)
    # In-flight requests (long polls included) may finish after SIGTERM before the process exits.
    # Idle keep-alive connections close after 5 s, a request head must arrive within client_timeout_s
    # (the body's limits are service.middleware.BodyLimits): a slow client cannot hold a connection.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_keep_alive=5,
        http=_head_deadline_protocol(settings.client_timeout_s),
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )


def _head_deadline_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request head takes over ``timeout_s``.

    uvicorn's own keep-alive timer stops at the first byte, so a client dribbling its headers would
    hold the connection forever.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None

        def _await_head(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(timeout_s, self._head_too_slow)

        def _head_too_slow(self) -> None:  # still IDLE: the request line and headers are not all in
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()

    return HeadDeadline


def worker(settings: Settings) -> None:
    from service.connections import create_queue
    from service.worker import Worker

    if not settings.redis_url:
        raise SystemExit("exclip-service worker needs REDIS_URL (without it, `serve` runs its own worker)")
    models = _load_models(settings)

    async def main() -> None:
        queue = create_queue(settings)
        w = Worker(queue, models, settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, w.stop)  # finish the current batch, then exit
        try:
            await w.run()
        finally:
            await queue.close()

    asyncio.run(main())


def _syntax(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that checks a selection's syntax with the library's parser, keeping the text."""

    def check(value: str) -> str:
        try:
            parse(value)
        except AttributionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return check


def explain(args: argparse.Namespace) -> int:
    """Call a running service, print a summary, write the JSON and the heatmap PNG if asked."""
    from service.client import Client, ClientError

    selections: list[Selection] = [*map(Span.parse, args.span), *map(Box.parse, args.box)]
    try:
        with Client(args.url, api_key=args.api_key, timeout_s=120) as client:
            job = client.explain(
                Path(args.image),
                args.caption,
                selections=selections,
                steps=args.steps,
                model=args.model,
                quadrature=args.quadrature,
                tolerance=args.tolerance,
                text_reference=args.text_reference,
            )
            _print_summary(job.raw["result"]["captions"][0])
            if args.json:
                Path(args.json).write_text(json.dumps(job.raw))
                print(f"wrote {args.json}")
            if args.png:
                Path(args.png).write_bytes(
                    client.heatmap(job, selection=selections[0] if selections else None)
                )
                print(f"wrote {args.png}")
    except ClientError as exc:
        print(f"error ({exc.status or 'no answer'}): {exc}", file=sys.stderr)
        return 1
    return 0


def _print_summary(caption: dict[str, Any]) -> None:
    c, grid, model = caption["completeness"], caption["grid"], caption["model"]
    weights = model["pretrained"] or "random weights"
    print(f"caption: {caption['caption']!r}  model: {model['name']} ({weights})")
    print(
        f"score (cosine): {caption['score']:.4f}  completeness: total {c['total']:.4f}, "
        f"expected {c['expected']:.4f}, gap {c['gap']:.2e}"
    )
    print(
        f"tokens: {len(caption['tokens'])}  grid: {grid['rows']}x{grid['cols']}  "
        f"compute: {caption['timings']['compute_ms']:.0f} ms"
    )
    if integration := caption.get("integration"):
        estimate = integration["error_estimate"]
        print(
            f"integration: {integration['rule']}, {integration['points']} points per tower"
            + ("" if estimate is None else f", error estimate {estimate:.1e}")
        )
    for sel in caption["selections"]:
        if sel["kind"] == "box":
            best = max(range(len(sel["token_scores"])), key=lambda i: sel["token_scores"][i])
            print(f"box {sel['box']}: strongest token {caption['tokens'][best]['text']!r}")
        else:
            print(f"{sel['kind']} {sel['start']}:{sel['end']}: tokens {sel.get('tokens')}")


def model_coverage() -> tuple[dict[str, list[str]], dict[str, str]]:
    """Every architecture open_clip knows (its own and this package's): those the engine explains, each
    with its pretrained tags (open_clip's, then the weights this package ships), and those it refuses,
    each with the reason; in open_clip's order."""
    import open_clip

    from attribution.models import MODEL_CARDS, unsupported_reason

    tags: dict[str, list[str]] = {}
    for name, tag in open_clip.list_pretrained():
        tags.setdefault(name, []).append(tag)
    for name, card in MODEL_CARDS.items():
        tags.setdefault(name, []).extend(card.weights)
    explained: dict[str, list[str]] = {}
    refused: dict[str, str] = {}
    for name in open_clip.list_models():
        reason = unsupported_reason(open_clip.get_model_config(name))
        if reason is None:
            explained[name] = tags.get(name, [])
        else:
            refused[name] = reason
    return explained, refused


def models(args: argparse.Namespace) -> int:
    """Print the explained architectures (with their pretrained tags) and the refused ones with why."""
    explained, refused = model_coverage()
    if args.json:
        print(json.dumps({"explained": explained, "refused": refused}, indent=2))
        return 0
    print(f"Explained: {len(explained)} architectures (pretrained tags in brackets)")
    for name, tags in explained.items():
        print(f"  {name}" + (f"  [{', '.join(tags)}]" if tags else ""))
    print(f"Refused: {len(refused)} architectures")
    for name, reason in refused.items():
        print(f"  {name}: {reason}")
    return 0


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="open_clip architecture (EXCLIP_MODEL)")
    p.add_argument("--pretrained", help="tag, checkpoint path, or none (EXCLIP_PRETRAINED)")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer directory (EXCLIP_TOKENIZER)")
    p.add_argument("--device", help="cpu, cuda or cuda:N; default cuda when present (EXCLIP_DEVICE)")
    p.add_argument("--cache-dir", dest="cache_dir", help="model download cache (EXCLIP_CACHE_DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exclip-service", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the API (and a worker when REDIS_URL is unset)")
    p_serve.add_argument("--host", help="bind address (EXCLIP_HOST)")
    p_serve.add_argument("--port", type=int, help="port (EXCLIP_PORT)")
    _model_flags(p_serve)
    _model_flags(sub.add_parser("worker", help="run a worker on REDIS_URL"))
    p_explain = sub.add_parser("explain", help="explain an image with a caption via a running service")
    p_explain.add_argument("image")
    p_explain.add_argument("caption")
    p_explain.add_argument("--span", action="append", type=_syntax(Span.parse), default=[], help="START:END")
    p_explain.add_argument("--box", action="append", type=_syntax(Box.parse), default=[], help="x0,y0,x1,y1")
    p_explain.add_argument("--json", help="write the job JSON here")
    p_explain.add_argument("--png", help="write the heatmap PNG (first selection, else the caption) here")
    p_explain.add_argument("--url", default="http://127.0.0.1:8000")
    p_explain.add_argument("--api-key", dest="api_key")
    p_explain.add_argument("--steps", type=int)
    p_explain.add_argument("--quadrature", choices=RULES, help="integration rule (default: riemann)")
    p_explain.add_argument("--tolerance", type=float, help="refine a nested rule to this relative error")
    p_explain.add_argument(
        "--text-reference",
        choices=TEXT_REFERENCES,
        help=f"text reference convention (default: {DEFAULT_TEXT_REFERENCE})",
    )
    p_explain.add_argument("--model")
    p_models = sub.add_parser("models", help="list the architectures explained and those refused, with why")
    p_models.add_argument("--json", action="store_true", help="print one JSON object instead")
    sub.add_parser("evaluate", add_help=False, help="grounding benchmark (see evaluate -h)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:  # the grounding benchmark has its own command line
        from attribution.evaluation.grounding.cli import main as evaluate

        return evaluate(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "models":
        return models(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "explain":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # the summary is the output, not request logs
        return explain(args)
    try:
        settings = _settings(args)
        serve(settings) if args.command == "serve" else worker(settings)
    except (AttributionError, ConfigError) as exc:  # ModelNotAvailable, a bad keys file: the message says
        print(f"exclip-service: {exc}", file=sys.stderr)  # what to do
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
