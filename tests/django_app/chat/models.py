"""The seed's chat models; Django names their tables `chat_chatroom`,
`chat_chatroom_participants` and `chat_chatmessage`, the ones hark reads."""

from django.conf import settings
from django.db import models


class ChatRoom(models.Model):
    TYPE_CHOICES = [("direct", "Direct"), ("group", "Group")]

    type = models.CharField(max_length=20, choices=TYPE_CHOICES, default="direct")
    name = models.CharField(max_length=255, blank=True)
    participants = models.ManyToManyField(settings.AUTH_USER_MODEL, related_name="chat_rooms")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]

    def __str__(self):
        return self.name or f"room {self.pk}"


class ChatMessage(models.Model):
    room = models.ForeignKey(ChatRoom, on_delete=models.CASCADE, related_name="messages")
    sender = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_messages"
    )
    content = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]

    def __str__(self):
        return f"{self.sender_id} in {self.room_id}: {self.content[:20]}"
