"""Sonos OAuth token service: the shared Lambda layer.

Parts, each readable alone: ``settings`` (environment + SSM), ``crypto`` (key ring,
AES-256-GCM), ``store`` (Supabase and Postgres behind one protocol), ``cache``
(Redis: OAuth state, token cache, refresh locks), ``provider`` (Sonos HTTP),
``manager`` (lifecycle rules), ``notifications`` and ``errors``.
"""

from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
