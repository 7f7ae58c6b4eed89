"""Edge to cloud: ``timm-splat serve`` (a LitServe inference service for splat CLIPs and timm
classifiers, :mod:`.api`), what it does per request (:mod:`.engine`, no serving library
needed), and ``timm-splat send`` (fit and encode on the client, post, time it: :mod:`.client`).
The service needs the ``serve`` extra: ``pip install 'timm-splat[serve]'``."""
