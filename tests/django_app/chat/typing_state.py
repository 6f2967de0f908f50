"""Who is typing, in the cache, as the seed's Phase 1 keeps it: a key per
room and user that expires 5 s after the user's last `is_typing: true`."""

from django.core.cache import cache

TYPING_TTL_S = 5


def _key(room_id, user_id):
    return f"typing:{room_id}:{user_id}"


def set_typing(room_id, user_id, is_typing):
    if is_typing:
        cache.set(_key(room_id, user_id), True, timeout=TYPING_TTL_S)
    else:
        cache.delete(_key(room_id, user_id))


def typing_user(room, requester_id):
    """A participant other than the requester who is typing now, or None."""
    for user in room.participants.all():
        if user.id != requester_id and cache.get(_key(room.id, user.id)):
            return user
    return None
