from django.contrib.auth.models import AbstractUser


class User(AbstractUser):
    """The seed's custom user (`AUTH_USER_MODEL = "users.User"`): table
    `users_user`."""
