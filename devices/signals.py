"""Signals other apps listen to (devices never imports them).

`audit_event(sender, actor, action, target, before, after)`: a change worth the audit log —
sent inside the transaction that makes it, so the entry commits (or not) with the change.
The registry records it (registry.audit).
"""

from django.dispatch import Signal

audit_event = Signal()
