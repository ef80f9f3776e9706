"""The controller's routes, one module per resource.

=================  ==============================================================
module             routes
=================  ==============================================================
:mod:`.about`      health, readiness, the API description, the identity, the
                   microservices on the bus
:mod:`.data`       uploads: upload, list, describe, release
:mod:`.compute`    starting a computation
:mod:`.results`    a computation's status and value, its events, its release
:mod:`.receipts`   a server's cosignature over a result's receipt
:mod:`.custody`    the catalogue, named datasets, grants and sources
=================  ==============================================================

Each route is a plain ``async def f(request) -> Response``; which method,
path and roles it answers is written in one table, in
:func:`fdrtd_server.app.create_app`, which also authenticates the caller and
audits the route's refusals (:func:`fdrtd_server.http_common.guarded`). The
peer routes are in :mod:`fdrtd_server.gateway` and :mod:`fdrtd_server.directory`.
"""
