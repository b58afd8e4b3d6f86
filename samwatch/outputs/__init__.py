"""Files for people and other tools, beside the GeoJSON: previews, label images, the dashboard."""
