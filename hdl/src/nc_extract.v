// Extractor: one signed n-bit value from a 32-bit window of two buffered 16-bit words.
// The window is {next word, current word}; the bit pointer (0..15) marks where the value
// starts in the current word. With ptr <= 15 and n <= 16 a value ends at bit 30 at most, so a
// value that straddles the two words is read in one step.
`default_nettype none
module nc_extract (
    input  wire [31:0] window,
    input  wire [3:0]  ptr,
    input  wire [15:0] mask,     // 2^n - 1, n in 2..16 (computed once per job)
    output wire [15:0] value     // sign-extended to 16 bits
);
    wire [31:0] shifted = window >> ptr;
    wire [15:0] raw = shifted[15:0] & mask;
    wire        sign = |(raw & ~(mask >> 1));             // bit n-1, the only bit left
    assign value = sign ? (raw | ~mask) : raw;
endmodule
`default_nettype wire
