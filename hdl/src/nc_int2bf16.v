// Signed 16-bit integer to bfloat16, rounded to nearest, ties to even (as ml_dtypes casts).
// |value| <= 2^15 needs at most exponent 127+15, so there is no overflow path.
`default_nettype none
module nc_int2bf16 (
    input  wire [15:0] value,
    output reg  [15:0] bf
);
    reg [15:0] mag, norm;
    reg [3:0]  k;
    reg [14:0] em;
    reg        inc;
    integer    i;
    always @(*) begin
        mag = value[15] ? (~value + 16'd1) : value;   // -32768 gives 0x8000, read as unsigned
        k = 4'd0;
        for (i = 0; i < 16; i = i + 1)
            if (mag[i]) k = i[3:0];                    // position of the leading one
        norm = mag << (4'd15 - k);                     // leading one at bit 15
        inc = norm[7] & ((|norm[6:0]) | norm[8]);      // round bit & (sticky | lsb)
        em = {8'd127 + {4'd0, k}, norm[14:8]} + {14'd0, inc};  // a carry moves into the exponent
        bf = (mag == 16'd0) ? 16'h0000 : {value[15], em};
    end
endmodule
`default_nettype wire
