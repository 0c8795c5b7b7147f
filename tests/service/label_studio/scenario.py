"""The Label Studio tests' shared scenario: the documented label config and one captioned image."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from service.label_studio.config import EXAMPLE_CONFIG

DOCUMENTED = EXAMPLE_CONFIG  # the config the README documents

WIDTH, HEIGHT = 96, 64
CAPTION = "a yellow 🐕 block on a blue field"  # an emoji: offsets must count code points
PHRASES = ["yellow 🐕 block", "blue field"]
SCENE_PATH = "/data/upload/1/scene.png"  # where the ``image_host`` fixture serves ``scene_png()``


def scene_png() -> bytes:
    """A WIDTH×HEIGHT gradient with a yellow block, as PNG bytes."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    arr = np.stack([x * 255 // WIDTH, np.full_like(x, 90), y * 255 // HEIGHT], axis=-1).astype(np.uint8)
    arr[HEIGHT // 4 : HEIGHT // 2, WIDTH // 3 : WIDTH // 2] = (250, 240, 30)
    out = io.BytesIO()
    Image.fromarray(arr, "RGB").save(out, format="PNG")
    return out.getvalue()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def file_server(root: Path) -> Iterator[str]:
    """Stands in for Label Studio's upload server: ``root`` over HTTP on a free port; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
