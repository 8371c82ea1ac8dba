// bfloat16 x bfloat16, rounded to nearest even. Subnormal inputs, and results whose exact
// magnitude is below 2^-126, flush to a signed zero; results rounding past the largest finite
// value give infinity; every NaN result is the canonical quiet NaN 0x7FC0.
`default_nettype none
module nc_bf16_mul (
    input  wire [15:0] a,
    input  wire [15:0] b,
    output reg  [15:0] p
);
    wire       s  = a[15] ^ b[15];
    wire [7:0] ea = a[14:7], eb = b[14:7];
    wire       za = (ea == 8'd0), zb = (eb == 8'd0);             // zero or subnormal
    wire       ia = (ea == 8'hFF) && (a[6:0] == 7'd0), ib = (eb == 8'hFF) && (b[6:0] == 7'd0);
    wire       na = (ea == 8'hFF) && (a[6:0] != 7'd0), nb = (eb == 8'hFF) && (b[6:0] != 7'd0);
    wire [15:0] prod = {1'b1, a[6:0]} * {1'b1, b[6:0]};          // in [2^14, 2^16)
    reg  [10:0] e;                                                // two's complement
    reg  [7:0]  m8;
    reg         rnd, sticky, inc;
    reg  [16:0] r;                                                // {10-bit exponent, 7-bit mantissa}
    always @(*) begin
        e = {3'd0, ea} + {3'd0, eb} - 11'd127 + {10'd0, prod[15]};
        if (prod[15]) begin m8 = prod[15:8]; rnd = prod[7]; sticky = |prod[6:0]; end
        else          begin m8 = prod[14:7]; rnd = prod[6]; sticky = |prod[5:0]; end
        inc = rnd & (sticky | m8[0]);
        r = {e[9:0], m8[6:0]} + {16'd0, inc};
        if (na | nb | (ia & zb) | (ib & za)) p = 16'h7FC0;
        else if (ia | ib)                    p = {s, 8'hFF, 7'd0};
        else if (za | zb)                    p = {s, 15'd0};
        else if (e[10] || e == 11'd0)        p = {s, 15'd0};          // below 2^-126: flush
        else if (r[16:7] >= 10'd255)         p = {s, 8'hFF, 7'd0};    // overflow
        else                                 p = {s, r[14:0]};
    end
endmodule
`default_nettype wire
