"""No HTTP views: the baseline only serves WebSockets."""
urlpatterns = []
