from typing import Any

from django.contrib import admin, messages
from django.forms import ModelForm
from django.http import HttpRequest

from accounts.models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "prefix", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    readonly_fields = ("digest", "prefix", "created_at", "last_used_at")

    def get_readonly_fields(self, request: HttpRequest, obj: ApiToken | None = None) -> tuple[str, ...]:
        # A token's value acts as its user: moving an existing token to another user would hand
        # that user's rights to whoever holds the value.
        return (*self.readonly_fields, "user") if obj is not None else tuple(self.readonly_fields)

    def save_model(self, request: HttpRequest, obj: ApiToken, form: ModelForm, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        # Added here, a token gets its value as `ApiToken.issue` gives one (without it the row
        # was stored with an empty digest: unusable, and the second such add broke the unique
        # digest with a 500); the raw value is shown once, never stored.
        raw, obj.digest, obj.prefix = ApiToken.new_value()
        super().save_model(request, obj, form, change)
        messages.warning(
            request, f"Token value for {obj.name!r}: {raw} — copy it now, it is not shown again."
        )

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        return {"user": request.user.pk}
