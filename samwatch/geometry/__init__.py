"""Binary masks to GeoJSON geometry, and back to pixels.

This package knows nothing of models or files: ``trace`` turns a 2-D mask into exact rings,
``simplify`` thins them, ``outline`` makes them GeoJSON geometry (``mask_to_geometry``), and
``raster`` turns geometry back into pixels. The features QuPath imports are
``samwatch.outputs``' (``shapes``, ``geojson``).

Conventions
-----------
Pixel corners
    Coordinates are pixels, x to the right, y down, origin at the top-left corner of the
    image. Pixel ``(x, y)`` covers the square ``[x, x+1] x [y, y+1]``, and every vertex lies
    on a pixel corner, as in QuPath's own contour tracing. A one-pixel object at ``(x, y)``
    is therefore the unit square ``[[x, y], [x+1, y], [x+1, y+1], [x, y+1], [x, y]]``, and
    filling the polygons by pixel centres (:func:`rasterize`) gives back exactly the mask.

Connectivity
    Foreground is 4-connected, background 8-connected. Each 4-connected part of the mask
    becomes one polygon, so pixels touching only at a corner are separate polygons of a
    MultiPolygon that touch at that single point. A background pocket closed off except at
    a corner is a hole of the polygon around it, touching its exterior at that point. Both
    are valid OGC/shapely geometry: every ring is simple (no vertex visited twice), rings
    touch only at isolated points, and each polygon's interior is connected.

Orientation
    RFC 7946 (right-hand rule) on the coordinates as written: exterior rings have positive
    shoelace area and holes negative, i.e. exteriors are counter-clockwise and holes
    clockwise when the numbers are plotted with y up (as GeoJSON tools and shapely's
    ``orient`` see them); on screen, with y down, exteriors appear clockwise. Each ring
    starts at its top-most, then left-most vertex.

Rings are closed (first == last), hold at least four positions, and keep only corners:
no repeated consecutive vertices, no collinear vertices along straight runs.
"""
