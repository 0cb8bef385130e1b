//! GGUF import (see below).
