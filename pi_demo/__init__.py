"""The Raspberry Pi demo: a terminal chat and an OpenAI-compatible HTTP server on nomoat.runtime.

Not part of the `nomoat` wheel: it is a folder you copy next to a bundle and run with
`python -m pi_demo chat BUNDLE` or `python -m pi_demo serve BUNDLE`. It needs only what
`pip install nomoat` installs (numpy, onnxruntime, tokenizers, jinja2) and the standard library.
"""
