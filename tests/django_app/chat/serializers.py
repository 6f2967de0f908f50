from rest_framework import serializers

from chat.models import ChatMessage, ChatRoom
from chat.typing_state import typing_user
from users.models import User


class UserSerializer(serializers.ModelSerializer):
    class Meta:
        model = User
        fields = ["id", "username", "first_name", "last_name"]


class MessageSerializer(serializers.ModelSerializer):
    sender = UserSerializer(read_only=True)

    class Meta:
        model = ChatMessage
        fields = ["id", "room", "sender", "content", "created_at"]
        read_only_fields = ["id", "room", "sender", "created_at"]


class RoomSerializer(serializers.ModelSerializer):
    participants = UserSerializer(many=True, read_only=True)
    last_message = serializers.SerializerMethodField()
    typing_user = serializers.SerializerMethodField()

    class Meta:
        model = ChatRoom
        fields = [
            "id",
            "type",
            "name",
            "participants",
            "last_message",
            "updated_at",
            "created_at",
            "typing_user",
        ]

    def get_last_message(self, room):
        last = room.messages.select_related("sender").order_by("-created_at", "-id").first()
        return MessageSerializer(last).data if last else None

    def get_typing_user(self, room):
        request = self.context.get("request")
        user = typing_user(room, request.user.id if request else None)
        return UserSerializer(user).data if user else None
