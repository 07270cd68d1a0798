"""Run a step stream ahead of the page: the model computes the next steps while Gradio sends this one.

Gradio drives a streaming handler in lockstep: it asks the generator for a step, postprocesses
and sends it (encodes the pictures, builds the message), and only then asks for the next one, so
the model idles while a step is sent and the page waits while the model works. On a small model
the two take about as long as each other (``benchmarks/bench_app.py``). :func:`prefetched`
iterates the stream in a thread of its own, a bounded number of steps ahead, so the two overlap
(PyTorch releases the interpreter lock inside its ops).

The stream is opened, iterated and closed in that one thread (the service's model lock and the
UNet hooks are taken and released there), and closing the consumer (Stop, a dropped connection)
stops the producer and waits for it: when :func:`prefetched`'s generator is closed, the stream is
closed too and its hooks are gone.
"""
from __future__ import annotations

import queue
import threading
from contextlib import closing
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

#: How many finished steps may wait for the page (more only adds latency to what the page shows).
DEPTH = 2


class _End:
    """The producer's last item: the stream ended, with ``error`` if it failed."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


def prefetched(open_stream: Callable[[], Iterator[T]], depth: int = DEPTH) -> Iterator[T]:
    """Yield the items of ``open_stream()``, computed in a producer thread up to ``depth`` ahead.

    ``open_stream`` is called in the producer thread (a generator is created there and never
    touched by another). An exception from the stream is raised here, in the consumer, after the
    items before it; closing this generator early stops the producer after its current item,
    closes the stream and joins the thread before returning.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        """Put ``item`` for the consumer; False once the consumer has gone."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            with closing(open_stream()) as stream:
                for item in stream:
                    if not offer(item):
                        return
        except BaseException as err:  # handed to the consumer, which raises it
            offer(_End(err))
            return
        offer(_End())

    thread = threading.Thread(target=produce, name="ldm-scene-stream", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = items.get(timeout=0.5)
            except queue.Empty:
                if not thread.is_alive() and items.empty():
                    raise RuntimeError("the step stream's thread ended without a word") from None
                continue
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        stop.set()
        thread.join()
