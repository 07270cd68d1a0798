"""The Gradio app: a plain service object (:mod:`.service`) and the Blocks built over it (:mod:`.blocks`).

Only this package imports gradio, and only :mod:`.blocks` and the tab modules do; the service is
plain Python/numpy/PIL and is tested without a server.
"""
