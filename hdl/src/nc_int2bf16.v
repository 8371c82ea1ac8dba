// Signed 16-bit integer to bfloat16, rounded to nearest, ties to even (as ml_dtypes casts), in
// two halves so that a lane can register between them: nc_int_norm finds the leading one and
// normalises, nc_int2bf16 rounds. |value| <= 2^15 needs at most exponent 127+15, so there is
// no overflow path.
`default_nettype none
module nc_int_norm (
    input  wire [15:0] value,
    output wire        sign,
    output reg  [3:0]  k,        // position of the leading one of |value|
    output wire [15:0] norm,     // |value| << (15 - k): leading one at bit 15 (0 for 0)
    output wire        zero
);
    wire [15:0] mag = value[15] ? (~value + 16'd1) : value;  // -32768: 0x8000, read unsigned
    integer i;
    always @(*) begin
        k = 4'd0;
        for (i = 0; i < 16; i = i + 1)
            if (mag[i]) k = i[3:0];
    end
    assign sign = value[15];
    assign norm = mag << (4'd15 - k);
    assign zero = (mag == 16'd0);
endmodule

module nc_int2bf16 (
    input  wire        sign,
    input  wire [3:0]  k,
    input  wire [15:0] norm,
    input  wire        zero,
    output wire [15:0] bf
);
    wire        inc = norm[7] & ((|norm[6:0]) | norm[8]);    // round bit & (sticky | lsb)
    wire [14:0] em = {8'd127 + {4'd0, k}, norm[14:8]} + {14'd0, inc};  // a carry moves into the exponent
    assign bf = zero ? 16'h0000 : {sign, em};
endmodule
`default_nettype wire
