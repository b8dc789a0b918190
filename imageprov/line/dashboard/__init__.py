"""The line station's screen: a dashboard and Prometheus metrics, served by ``flash --wait --dashboard``.

``access`` decides who may look and who may stop the line (pure functions),
``page`` renders the screen as HTML (no framework, nothing downloaded),
``metrics`` counts cards for Prometheus, and ``server`` serves the three with
aiohttp from a thread of its own, so that the flashing loop runs as it does
without a screen. What they show is :mod:`imageprov.line.station`'s.
"""
