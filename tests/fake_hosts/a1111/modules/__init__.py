"""A stand-in for the parts of AUTOMATIC1111 1.10's `modules` package that Semantic Fidelity
touches, written from ../shared/hosts/a1111.md (field names, call order, batch layout). It drives
the real `ldm` UNet test bed; only the text encoder is a small deterministic stand-in
(tests/testbed/text_encoder.py). Tests put tests/fake_hosts/a1111 first on sys.path."""
