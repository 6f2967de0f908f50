from rest_framework.routers import SimpleRouter

from chat.views import MessageViewSet, RoomViewSet

router = SimpleRouter()
router.register("rooms", RoomViewSet, basename="room")
router.register("messages", MessageViewSet, basename="message")

urlpatterns = router.urls
