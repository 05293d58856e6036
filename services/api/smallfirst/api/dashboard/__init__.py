"""The web dashboard served by the API under /ui (routes.py, views.py, charts.py, session.py)."""
