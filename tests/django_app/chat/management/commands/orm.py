"""`manage.py orm`: Django's ORM driven by the tests, one command a line.

Each line on stdin is a JSON object `{"op": NAME, ...arguments}`; each
answer is one line on stdout, `{"ok": RESULT}` or `{"error": TEXT}`. Every
write is what a Django view, a signal or a shell would do: model methods
and querysets, autocommit (each command has committed before its answer),
`transaction.atomic` where a command writes several rows at once.
Messages come back as the DRF serializer formats them.
"""

import json
import sys

from django.core.management.base import BaseCommand
from django.db import transaction
from rest_framework_simplejwt.tokens import RefreshToken

from chat.models import ChatMessage, ChatRoom
from chat.serializers import MessageSerializer
from users.models import User


def message(m):
    return MessageSerializer(m).data


class Command(BaseCommand):
    help = "Runs ORM commands read as JSON lines from stdin (for the tests)."

    def handle(self, *args, **options):
        out = sys.stdout
        out.write(json.dumps({"ok": "ready"}) + "\n")
        out.flush()
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                cmd = json.loads(line)
                op = getattr(self, "op_" + cmd.pop("op"))
                answer = {"ok": op(**cmd)}
            except Exception as e:  # the test prints it
                answer = {"error": f"{type(e).__name__}: {e}"}
            out.write(json.dumps(answer) + "\n")
            out.flush()

    def op_user(self, username, password=None, first_name="", last_name=""):
        user = User.objects.create_user(
            username, password=password, first_name=first_name, last_name=last_name
        )
        return user.id

    def op_room(self, members, name="", type="group"):
        with transaction.atomic():
            room = ChatRoom.objects.create(name=name, type=type)
            room.participants.add(*members)
        return room.id

    def op_tokens(self, user):
        """simplejwt's pair for a user, as TokenObtainPairView makes it."""
        refresh = RefreshToken.for_user(User.objects.get(pk=user))
        return {"access": str(refresh.access_token), "refresh": str(refresh)}

    def op_send(self, room, sender, content):
        return message(ChatMessage.objects.create(room_id=room, sender_id=sender, content=content))

    def op_send_many(self, room, sender, contents):
        """Several messages in one transaction (one commit)."""
        with transaction.atomic():
            created = [
                ChatMessage.objects.create(room_id=room, sender_id=sender, content=c)
                for c in contents
            ]
        return [message(m) for m in created]

    def op_edit(self, id, content):
        """An edit through the model: `save()` writes every column."""
        m = ChatMessage.objects.get(pk=id)
        m.content = content
        m.save()
        return message(m)

    def op_update(self, ids, content):
        """An edit through a queryset: one UPDATE, no save()."""
        return ChatMessage.objects.filter(pk__in=ids).update(content=content)

    def op_delete(self, id):
        ChatMessage.objects.get(pk=id).delete()
        return id

    def op_delete_where(self, room, content_prefix):
        """A queryset delete; returns the ids deleted."""
        qs = ChatMessage.objects.filter(room_id=room, content__startswith=content_prefix)
        with transaction.atomic():
            ids = sorted(qs.values_list("id", flat=True))
            qs.delete()
        return ids

    def op_move(self, id, room):
        """A message moved to another room through save()."""
        m = ChatMessage.objects.get(pk=id)
        m.room_id = room
        m.save()
        return message(m)

    def op_delete_room(self, room):
        """`room.delete()`: its messages and memberships go with it."""
        ChatRoom.objects.get(pk=room).delete()
        return None

    def op_leave(self, room, user):
        """`room.participants.remove(user)`: the M2M's own delete."""
        ChatRoom.objects.get(pk=room).participants.remove(user)
        return None

    def op_rename(self, user, first_name):
        u = User.objects.get(pk=user)
        u.first_name = first_name
        u.save()
        return None

    def op_delete_user(self, user):
        """`user.delete()`: Django's collector deletes the user's messages
        and memberships with it, in one transaction."""
        User.objects.get(pk=user).delete()
        return None

    def op_get(self, id):
        m = ChatMessage.objects.select_related("sender").filter(pk=id).first()
        return message(m) if m else None
