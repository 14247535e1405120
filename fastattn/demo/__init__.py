"""The demo of ``python -m fastattn demo``: the lecture notes' worked examples
(:mod:`~fastattn.demo.examples`), printed side by side with the reference
(:mod:`~fastattn.demo.console`) and drawn (:mod:`~fastattn.demo.plots`, optional
matplotlib). Not part of the library's API."""
