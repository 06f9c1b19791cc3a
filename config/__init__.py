# Load the Celery app with Django so `celery.current_app` is EdgeFit's in web processes too
# (views enqueue tasks by name through it without importing `workers`).
from config.celery import app as celery_app

__all__ = ["celery_app"]
