"""``detect``: run converted weights on images and draw the detections."""
