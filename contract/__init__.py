"""What both sides of the wire share: model specs and limits (specs), tensor encoding (codec), the
request cost model (cost) and the error classes (errors). The clients (client/), the facade (api/)
and the code inside Triton (serving/) all import it; it imports only common/ and tritonclient."""
