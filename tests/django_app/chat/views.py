"""The seed's Phase 1 chat API as DRF views: the rooms list, typing, the
3-second poll (`poll?room_id=&since=<ISO timestamp>`), sending, and the
message history. hark serves the same paths (docs/API.md); the history
stays with Django."""

from django.shortcuts import get_object_or_404
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.response import Response

from chat.models import ChatMessage, ChatRoom
from chat.serializers import MessageSerializer, RoomSerializer
from chat.typing_state import set_typing

POLL_LATEST = 50


def room_of(request, room_id):
    """The room, 404 if it does not exist, 403 unless the user is in it."""
    room = get_object_or_404(ChatRoom, pk=room_id)
    if not room.participants.filter(pk=request.user.pk).exists():
        raise PermissionDenied("Not a participant")
    return room


def int_param(value, name):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValidationError({"error": f"{name} must be an integer"})


class RoomViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = RoomSerializer

    def get_queryset(self):
        return (
            ChatRoom.objects.filter(participants=self.request.user)
            .prefetch_related("participants")
            .order_by("-updated_at")
        )

    def get_object(self):
        return room_of(self.request, self.kwargs["pk"])

    @action(detail=True, methods=["post"])
    def typing(self, request, pk=None):
        room = room_of(request, pk)
        is_typing = request.data.get("is_typing", False)
        if not isinstance(is_typing, bool):
            raise ValidationError({"error": "is_typing must be a boolean"})
        set_typing(room.id, request.user.id, is_typing)
        return Response({"success": True, "message": "Typing status updated"})

    @action(detail=True, methods=["get"])
    def messages(self, request, pk=None):
        """The room's whole history, oldest first (Django's alone)."""
        room = room_of(request, pk)
        messages = room.messages.select_related("sender").order_by("created_at", "id")
        return Response(MessageSerializer(messages, many=True).data)


class MessageViewSet(mixins.CreateModelMixin, viewsets.GenericViewSet):
    serializer_class = MessageSerializer
    queryset = ChatMessage.objects.select_related("sender")

    def create(self, request, *args, **kwargs):
        room_id = request.data.get("room_id", request.data.get("room"))
        room = room_of(request, int_param(room_id, "room_id"))
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        message = serializer.save(room=room, sender=request.user)
        room.save(update_fields=["updated_at"])
        set_typing(room.id, request.user.id, False)
        return Response(self.get_serializer(message).data, status=status.HTTP_201_CREATED)

    @action(detail=False, methods=["get"])
    def poll(self, request):
        """Messages after `since` (an ISO timestamp: the created_at of the
        last message the client has), or the latest ones; at once."""
        room = room_of(request, int_param(request.query_params.get("room_id"), "room_id"))
        messages = room.messages.select_related("sender")
        since = request.query_params.get("since")
        if since:
            # A `+` of an offset arrives as a space when not escaped.
            parsed = parse_datetime(since.replace(" ", "+"))
            if parsed is None:
                raise ValidationError({"error": "since must be an ISO timestamp"})
            messages = messages.filter(created_at__gt=parsed).order_by("created_at", "id")
        else:
            latest = messages.order_by("-created_at", "-id")[:POLL_LATEST]
            messages = sorted(latest, key=lambda m: (m.created_at, m.id))
        return Response(
            {
                "messages": MessageSerializer(messages, many=True).data,
                "timestamp": timezone.now().isoformat(),
            }
        )
