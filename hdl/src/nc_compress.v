// Compressor (the extractor's inverse): append the low n bits of a code to a bit accumulator
// holding `fill` (0..15) pending bits; a full 16-bit word leaves when 16 bits are pending.
`default_nettype none
module nc_compress (
    input  wire [31:0] acc,
    input  wire [4:0]  fill,
    input  wire [15:0] code,
    input  wire [4:0]  n,
    input  wire [15:0] mask,     // 2^n - 1 (computed once per job)
    output wire [31:0] acc_next,
    output wire [4:0]  fill_next,
    output wire        emit,
    output wire [15:0] word
);
    wire [31:0] merged = acc | ({16'd0, code & mask} << fill);
    wire [5:0]  f2 = {1'b0, fill} + {1'b0, n};                  // <= 31
    assign emit = (f2 >= 6'd16);
    assign word = merged[15:0];
    assign acc_next = emit ? (merged >> 16) : merged;
    assign fill_next = emit ? (f2[4:0] - 5'd16) : f2[4:0];
endmodule
`default_nettype wire
