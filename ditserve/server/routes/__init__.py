"""The HTTP routes, one module per area; each is an APIRouter that create_app includes."""
